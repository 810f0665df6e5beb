"""Workers: long-lived loops that claim jobs, run them on an engine and write the results."""
