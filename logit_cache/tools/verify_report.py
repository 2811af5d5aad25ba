"""The report of ``verify``: one :class:`Check` per thing verified; ``ok`` only when every check held."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Check:
    """One thing verified: its kind, what it is about, whether it held, and what was found.

    ``notice`` marks a check worth telling even when it holds (a teacher file that changed but
    still gives the cached outputs).
    """

    kind: str
    subject: str
    ok: bool
    detail: str
    notice: bool = False

    def line(self) -> str:
        return f"{self.subject}: {self.detail}"


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_cache`: ``ok`` only when every check held."""

    path: str
    ok: bool = True
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    summary: str = ""

    def add(self, kind: str, subject: str, ok: bool, detail: str, notice: bool = False) -> Check:
        check = Check(kind, subject, bool(ok), detail, notice)
        self.checks.append(check)
        if not check.ok:
            self.failures.append(check.line())
            self.ok = False
        return check

    @property
    def notices(self) -> list[str]:
        return [check.line() for check in self.checks if check.ok and check.notice]

    def to_dict(self) -> dict[str, Any]:
        """``{"path", "ok", "checks", "failures"}`` (plus the summary line): what ``--json`` prints."""
        return {
            "path": self.path,
            "ok": self.ok,
            "checks": [asdict(check) for check in self.checks],
            "failures": list(self.failures),
            "summary": self.summary,
        }
