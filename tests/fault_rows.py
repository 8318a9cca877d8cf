"""The fault-injection suite's row registry, and the README's "what happens when" table built from it.

Each fault test is decorated with ``@row(when, outcome)``: the input or fault it performs and the
outcome it asserts. ``python tests/fault_rows.py`` rewrites the README table between its markers;
``test_readme_fault_table_is_generated_from_the_suite`` fails when the two disagree.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BEGIN, END = "<!-- fault-table:begin (python tests/fault_rows.py) -->", "<!-- fault-table:end -->"
MODULES = ("test_faults", "test_faults_train", "test_sweep_driver", "test_sweep_refusals")
DIRS = (Path(__file__).parent, Path(__file__).parent / "unit", Path(__file__).parent / "integration")
ROWS: list[tuple[str, str, str]] = []  # (when, outcome, test)


def row(when: str, outcome: str):
    def mark(fn):
        path = Path(inspect.getsourcefile(fn)).resolve().relative_to(REPO).as_posix()  # tests/<unit|integration>/...
        ROWS.append((when, outcome, f"{path}::{fn.__name__}"))
        return fn
    return mark


def table() -> str:
    """The markdown table of every registered row, in suite order (importing the modules registers them)."""
    for d in DIRS:
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))
    for name in MODULES:
        importlib.import_module(name)
    seen, lines = set(), ["| when | what happens | checked by |", "|---|---|---|"]
    order = {name: i for i, name in enumerate(MODULES)}  # suite order, whatever order pytest imported them in
    rows = sorted(enumerate(ROWS), key=lambda ir: (order.get(Path(ir[1][2].split("::")[0]).stem, len(order)), ir[0]))
    for _, (when, outcome, test) in rows:
        if (when, test) not in seen:
            seen.add((when, test))
            lines.append(f"| {when} | {outcome} | `{test}` |")
    return "\n".join(lines)


def readme_section() -> str:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        return ""
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()


def write_readme() -> None:
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


if __name__ == "__main__":  # run as a script: use the importable module, whose ROWS the tests fill
    sys.path.insert(0, str(Path(__file__).parent))
    import fault_rows

    fault_rows.write_readme()
    print(f"wrote the fault table ({len(fault_rows.ROWS)} rows) into {README}")
