"""Prompt policy: a tenant's blocked terms and patterns, then the service's pluggable classifier, checked before a
job is queued. A refusal is a `PromptBlocked` (422, code `prompt_blocked`) whose message is the rule's reason.

Only the prompt is held to the tenant's rules. A blocked term in a *negative* prompt asks the model to steer away from
it ("nsfw, gore" is the most common negative prompt there is), so refusing it would block the careful users. The
classifier sees both and may judge the negative prompt itself.

Terms match whole words after normalisation (NFKC, casefold, accents, zero-width and other format characters
dropped), so `B a D`, `ｂａｄ`, `bad!!!` and `b.a.d` all match the term `bad` while `badminton` does not. That catches
simple evasions, not homoglyphs from other scripts or leetspeak: a classifier is the place for those.

Regex rules run on RE2 (google-re2), whose matching time is linear in the prompt whatever the pattern: a tenant's
pattern is untrusted input, and no heuristic over a backtracking engine's syntax catches every catastrophic shape
(`(a|a)*$` took 46 s on 27 characters with `re`). RE2 has no backreferences or lookarounds; a pattern it cannot compile
is refused when the policy is stored (`validate_rules`, 422 naming the rule) and fails closed here if one was stored
before.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import re2

from darkroom.auth.tenants import PromptRule, TenantPolicy
from darkroom.config import Settings
from darkroom.errors import InvalidRequest, PromptBlocked, ServiceUnavailable

log = logging.getLogger("darkroom.safety")

PROMPT_CLASSIFIER = "security.prompt_classifier (DARKROOM_SECURITY__PROMPT_CLASSIFIER)"
OUTPUT_CHECKER = "security.output_checker (DARKROOM_SECURITY__OUTPUT_CHECKER)"

PromptClassifier = Callable[[str, str | None, str], str | None]
"""classifier(prompt, negative_prompt, tenant) → None (allowed) or the reason it is refused."""

_WORD = re.compile(r"[^\W_]+")  # letters and digits; `_` separates words like any punctuation
_DROPPED = {"Mn", "Me", "Cf"}  # combining marks (accents) and format characters (zero-width spaces, joiners, …)
_MAX_MEM = 8 << 20  # RE2's budget per compiled rule: a pattern whose automaton needs more is refused at store time


# --- hooks ---------------------------------------------------------------------------------------------------------


def load_hook(path: str, setting: str = PROMPT_CLASSIFIER) -> Callable[..., Any]:
    """Import `module:callable` (the callable may be dotted, `module:Class.method`). A bad path is a `ValueError`
    naming the setting, so a typo stops the service at start instead of failing every request."""
    module_name, sep, attr = path.strip().partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{setting}: {path!r} is not a `module:callable` path")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or whatever the module raised while importing
        raise ValueError(f"{setting}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"{setting}: {module_name!r} has no {attr!r}") from None
    if not callable(target):
        raise ValueError(f"{setting}: {path!r} is not callable")
    return target


@functools.lru_cache(maxsize=16)
def cached_hook(path: str, setting: str) -> Callable[..., Any]:
    """`load_hook`, imported once per process and path."""
    return load_hook(path, setting)


def validate_hooks(settings: Settings, *, output_checker: bool = True) -> None:
    """Load every configured hook now, at start-up: a `ValueError` naming the setting instead of failing jobs later.
    `output_checker=False` leaves the output checker to the workers (it may import torch, which an API-only process
    otherwise never loads)."""
    security = settings.security
    if security.prompt_classifier:
        cached_hook(security.prompt_classifier, PROMPT_CLASSIFIER)
    if output_checker and security.output_checker:
        cached_hook(security.output_checker, OUTPUT_CHECKER)


# --- the check -----------------------------------------------------------------------------------------------------


def check_prompt(
    settings: Settings, policy: TenantPolicy, tenant: str, prompt: str, negative_prompt: str | None
) -> None:
    """Raise `PromptBlocked` (field `prompt`) if a tenant rule or the classifier refuses the prompt."""
    if len(prompt) > settings.limits.max_prompt_chars:  # also bounds the time a regex rule can take
        raise InvalidRequest(f"prompt must be at most {settings.limits.max_prompt_chars} characters", field="prompt")
    reason = matching_rule(policy.prompt_rules, prompt) if policy.prompt_rules else None  # no rules: no normalising
    if reason is not None:
        raise PromptBlocked(reason, field="prompt")
    if settings.security.prompt_classifier:
        _classify(settings.security.prompt_classifier, prompt, negative_prompt, tenant)


def matching_rule(rules: Iterable[PromptRule], text: str) -> str | None:
    """The reason of the first rule `text` breaks, or None."""
    normal = normalise(text)
    words = _word_forms(normal.casefold())
    for index, rule in enumerate(rules):
        if rule.kind == "term" and _has_term(words, rule.pattern):
            return rule.reason
        if rule.kind == "regex" and _regex_matches(index, rule.pattern, (text, normal)):
            return rule.reason
    return None


def normalise(text: str) -> str:
    """NFKC with accents and format characters removed: `ｂａｄ` → `bad`, `nu\u200bde` → `nude`, `é` → `e`."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(ch for ch in decomposed if unicodedata.category(ch) not in _DROPPED)
    return unicodedata.normalize("NFKC", kept)


def _classify(path: str, prompt: str, negative_prompt: str | None, tenant: str) -> None:
    classifier = cached_hook(path, PROMPT_CLASSIFIER)
    try:
        verdict = classifier(prompt, negative_prompt, tenant)
    except Exception as exc:  # fail closed: an unchecked prompt is not queued, and the caller may retry
        log.exception("prompt classifier %s failed", path)
        raise ServiceUnavailable(f"the prompt classifier failed ({type(exc).__name__}); try again") from exc
    if verdict is None or verdict is False:
        return
    reason = verdict if isinstance(verdict, str) and verdict.strip() else "refused by the prompt classifier"
    raise PromptBlocked(reason, field="prompt")


# --- terms ---------------------------------------------------------------------------------------------------------


def _words(casefolded: str) -> list[str]:
    return _WORD.findall(casefolded)


def _word_forms(casefolded: str) -> tuple[str, ...]:
    """The prompt's words joined by single spaces (padded, for whole-word search): as written, and with runs of
    single characters joined up, so `n u d e` and `n.u.d.e` read as `nude`."""
    words = _words(casefolded)
    forms = [words, list(_join_spelled_out(words))]
    return tuple(f" {' '.join(form)} " for form in forms)


def _join_spelled_out(words: list[str]) -> Iterator[str]:
    run: list[str] = []
    for word in [*words, ""]:
        if len(word) == 1:
            run.append(word)
            continue
        if run:
            yield "".join(run)
            run = []
        if word:
            yield word


@functools.lru_cache(maxsize=4096)
def _term_words(term: str) -> str:
    return " ".join(_words(normalise(term).casefold()))


def _has_term(forms: tuple[str, ...], term: str) -> bool:
    words = _term_words(term)
    if not words:  # a term of punctuation only: plain substring
        return any(normalise(term).casefold() in form for form in forms)
    needle = f" {words} "
    return any(needle in form for form in forms)


# --- regular expressions -------------------------------------------------------------------------------------------


def validate_rules(rules: Iterable[PromptRule]) -> None:
    """A `ValueError` naming the first regex rule RE2 cannot compile. For the code that stores tenant policies: refuse
    such a rule there (422) rather than at every submit."""
    for index, rule in enumerate(rules):
        if rule.kind == "regex":
            problem = _regex_problem(rule.pattern)
            if problem:
                raise ValueError(f"prompt_rules[{index}]: {problem}")


def _options() -> re2.Options:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # a refused pattern is reported to the caller, not printed on the server's stderr
    options.max_mem = _MAX_MEM
    return options


def _regex_problem(pattern: str) -> str | None:
    try:
        re2.compile(pattern, _options())
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return f"not a regular expression RE2 accepts (no backreferences or lookarounds): {detail}"
    return None


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> Any:
    """The compiled RE2 pattern, or None when RE2 refuses it."""
    try:
        return re2.compile(pattern, _options())
    except re2.error:
        return None


def _regex_matches(index: int, pattern: str, texts: tuple[str, str]) -> bool:
    """Searched in the prompt as written and normalised, so `caf(e|é)` and evasions of `cafe` both count."""
    compiled = _compiled(pattern)
    if compiled is None:  # fail closed: an unusable rule refuses, and says which rule to fix
        log.error("prompt rule %d has a pattern RE2 refuses %r; refusing prompts until it is fixed", index, pattern)
        raise PromptBlocked(
            f"the tenant's prompt rule {index} is unusable and must be fixed by an administrator", field="prompt"
        )
    return any(compiled.search(text) for text in texts)
