"""The built-in demo model: a procedural world of captioned shapes (`world`), a small SD 1.x model trained on it
(`model`, `train`), the reading of its pictures back from pixels (`reading`) and its installation as the default model
of a fresh models dir (`install`). See docs/demo-model.md."""
