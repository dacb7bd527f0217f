"""What one index update did (`UpdateSummary`), and the lines that tell it on stderr. Standard
library only: a command whose search a server did prints the server's summary with it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class UpdateSummary:
    """What one update did. added/updated/renamed count files now indexed with a vector (some of
    them `reused` another file's vector without the model); `failed` the files that failed in this
    run; `still_failing` unchanged files whose earlier failure stands; `files` the image files found
    under the roots; `interrupted` a run stopped by KeyboardInterrupt after committing its work."""

    added: int = 0
    updated: int = 0
    renamed: int = 0
    removed: int = 0
    failed: int = 0
    unchanged: int = 0
    reused: int = 0
    embedded: int = 0
    still_failing: int = 0
    facts_read: int = 0  # files whose date, place, camera and perceptual hash were read without the model
    files: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    skipped_names: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "UpdateSummary":
        """A summary sent as JSON (a server's); fields this version does not know are left out."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.renamed or self.removed or self.failed or self.facts_read)

    def line(self, what: str) -> str:
        """'indexed WHAT: 12 added, 3 updated, 2 renamed, 1 removed, 1 failed (1,234 files, 0.8 s)', with
        '; dates, places and cameras read from N photos' when an older index gained its facts."""
        counts = [(self.added, "added"), (self.updated, "updated"), (self.renamed, "renamed"),
                  (self.removed, "removed"), (self.failed, "failed")]
        text = ", ".join(f"{n:,} {word}" for n, word in counts if n) or "no changes"
        if self.facts_read:
            text += f"; dates, places and cameras read from {self.facts_read:,} photo{'' if self.facts_read == 1 else 's'}"
        return f"indexed {what}: {text} ({self.files:,} file{'' if self.files == 1 else 's'}, {self.seconds:.1f} s)"


def report_update(summary: UpdateSummary, what: str, msgs) -> None:
    """The update's stderr lines: one summary note when something changed, one warning when
    images could not be indexed (each was named as it failed)."""
    if summary.changed:
        msgs.note(summary.line(what))
    if summary.failed:
        msgs.warn(f"{summary.failed:,} image{'s' if summary.failed > 1 else ''} could not be indexed "
                  "(named above) and cannot be found")
