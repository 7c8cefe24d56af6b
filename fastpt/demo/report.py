"""The demo's report: tables printed to the terminal as they come and collected, with text
and plots, into ``report.md`` in the output folder (the plots next to it, see plots.py)."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field

from fastpt._atomic import atomic_write


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def markdown_table(headers, rows) -> str:
    """A GitHub Markdown table; columns after the first are right-aligned."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(map(_cell, headers)) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers, rows) -> str:
    """The same table, aligned for a terminal."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def row_printer(headers, widths, write=None):
    """Prints ``headers`` now and returns a function that prints one row, for tables whose
    rows are printed as they are measured; columns padded to ``widths`` (at least the
    header's). ``write``: the line writer (default print; tqdm.write next to a bar)."""
    widths = [max(w, len(h)) for h, w in zip(headers, widths)]
    write = write or (lambda line: print(line, flush=True))

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    write(line(headers))
    return lambda row: write(line(row))


@dataclass
class Section:
    """One section of the report: Markdown blocks, its time and, if it failed, the error;
    ``interrupted``: what stopped it (KeyboardInterrupt, SystemExit, ...), if something did."""

    key: str
    title: str
    number: int
    blocks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    trace: str | None = None
    interrupted: str | None = None

    @property
    def status(self) -> str:
        return "interrupted" if self.interrupted else "failed" if self.error else "ok"

    def text(self, markdown: str, echo: bool = True) -> None:
        self.blocks.append(markdown.strip())
        if echo:
            print(markdown.strip(), flush=True)

    def table(self, headers, rows, caption: str = "", echo: bool = True) -> None:
        """Adds a table (and prints it unless ``echo`` is False, e.g. when its rows were
        printed one by one as they were measured)."""
        self.blocks.append((caption.strip() + "\n\n" if caption else "") + markdown_table(headers, rows))
        if echo:
            print(("\n" + caption.strip() if caption else "") + "\n" + text_table(headers, rows) + "\n",
                  flush=True)

    def code(self, text: str) -> None:
        self.blocks.append("```\n" + text.rstrip() + "\n```")
        print(text.rstrip(), flush=True)

    def image(self, filename: str, alt: str) -> None:
        self.blocks.append(f"![{alt}]({filename})")
        print(f"[plot: {filename}]", flush=True)

    def fail(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {error}"
        self.trace = "".join(traceback.format_exception(error))

    def interrupt(self, error: BaseException) -> None:
        """Marks the section as stopped part-way (its tables so far are kept)."""
        self.interrupted = type(error).__name__

    def markdown(self) -> str:
        parts = [f"## {self.number}. {self.title}", *self.blocks]
        if self.interrupted:
            parts.append(f"**This section was interrupted** ({self.interrupted}) after "
                         f"{self.seconds:.1f} s; what it shows above is partial, and the demo stopped here.")
        if self.error:
            parts.append(f"**This section failed** after {self.seconds:.1f} s: `{self.error}`")
            parts.append("<details><summary>traceback</summary>\n\n```\n" + self.trace.rstrip()
                         + "\n```\n</details>")
        return "\n\n".join(parts)


class Report:
    """Sections in the order they ran, a header, and the summary of times and failures."""

    def __init__(self, out_dir: str, title: str, preamble: str):
        self.out_dir, self.title, self.preamble = out_dir, title, preamble
        self.sections: list[Section] = []

    def section(self, key: str, title: str) -> Section:
        sec = Section(key, title, len(self.sections) + 1)
        self.sections.append(sec)
        print(f"\n== {sec.number}. {title} ==\n", flush=True)
        return sec

    @property
    def failed(self) -> list[Section]:
        return [s for s in self.sections if s.error]

    def summary_rows(self) -> list[list[str]]:
        rows = [[f"{s.number}. {s.title}", s.status, f"{s.seconds:.1f}"] for s in self.sections]
        status = ", ".join(([f"{len(self.failed)} failed"] if self.failed else [])
                           + (["interrupted"] if any(s.interrupted for s in self.sections) else []))
        rows.append(["total", status or "ok", f"{sum(s.seconds for s in self.sections):.1f}"])
        return rows

    def markdown(self) -> str:
        parts = [f"# {self.title}", self.preamble.strip(), "## Time per section",
                 markdown_table(["section", "status", "seconds"], self.summary_rows())]
        parts += [s.markdown() for s in self.sections]
        return "\n\n".join(parts) + "\n"

    def write(self) -> str:
        path = os.path.join(self.out_dir, "report.md")
        text = self.markdown()

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        atomic_write(path, write)
        return path
