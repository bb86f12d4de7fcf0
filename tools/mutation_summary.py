"""Tally of a mutmut 3 run for one module (run by tools/mutation.sh, in its work directory).

Usage: python tools/mutation_summary.py FILE [--globs G ...] [--pending | --open | --excluded]

Counts the verdicts in mutants/FILE.meta. Timeouts count as killed (issue 19);
mutants that change only the text of a raised error's message are excluded
(found by comparing each mutant's AST with the original's, message strings
blanked); mutants listed in tools/mutation_equivalent.txt (`name  reason`)
are equivalent. Prints the score (killed / (total - excluded - equivalent))
and every other survivor. With --pending, prints only the names not yet
checked, with --open only those not killed (for `mutmut run NAME...`),
with --excluded the excluded ones.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
KILLED = {1: "killed", 3: "killed"}
TIMEOUT = {36, 24, -24, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


def _blank_messages(tree: ast.AST) -> str:
    """The AST dump with message text blanked.

    Message text: the strings of a `raise` statement, and any string with a
    space in it (prose: the flags' explanations; names, keys and options such
    as "inf" or "DESCENDING" have none).
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                    inner.value = ""
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if " " in node.value.replace("XX", ""):
                node.value = ""
    return ast.dump(tree)


def message_only(source: str) -> set[str]:
    """Names of the mutants in `source` (mutmut's trampolined file) that change only messages."""
    functions = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions[node.name] = node
    found = set()
    for name, node in functions.items():
        match = re.fullmatch(r"(.*)__mutmut_(\d+)", name)
        if not match or (original := functions.get(match.group(1) + "__mutmut_orig")) is None:
            continue
        node.name = original.name
        if _blank_messages(node) == _blank_messages(original):
            found.add(name)
    return found


def equivalents() -> dict[str, str]:
    table = {}
    path = HERE / "mutation_equivalent.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            table[name] = reason.strip()
    return table


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--globs", nargs="*", default=[])
    parser.add_argument("--pending", action="store_true")
    parser.add_argument("--open", action="store_true")
    parser.add_argument("--excluded", action="store_true")
    args = parser.parse_args()
    meta = json.loads(pathlib.Path(f"mutants/{args.file}.meta").read_text())
    verdicts = meta["exit_code_by_key"]
    if args.globs:
        verdicts = {
            k: v for k, v in verdicts.items() if any(fnmatch.fnmatch(k, g) for g in args.globs)
        }
    if args.pending:
        print(" ".join(sorted(k for k, v in verdicts.items() if v is None)))
        return 0
    source = pathlib.Path(f"mutants/{args.file}").read_text()
    messages = message_only(source)
    excluded = {k for k in verdicts if k.split(".")[-1] in messages}
    equivalent = {k: r for k, r in equivalents().items() if k in verdicts}
    if args.excluded:
        by_function: dict[str, list[str]] = {}
        for name in sorted(excluded, key=lambda k: int(k.rsplit("_", 1)[1])):
            function, number = name.rsplit("__mutmut_", 1)
            by_function.setdefault(function, []).append(number)
        for function, numbers in sorted(by_function.items()):
            print(f"{function}__mutmut_{{{','.join(numbers)}}}")
        return 0
    if args.open:
        settled = KILLED.keys() | TIMEOUT | {None}
        print(
            " ".join(
                k
                for k, v in sorted(verdicts.items())
                if v not in settled and k not in excluded and k not in equivalent
            )
        )
        return 0
    counts = {"killed": 0, "timeout": 0, "survived": 0, "no tests": 0, "other": 0, "unchecked": 0}
    open_ = []
    for name, code in sorted(verdicts.items()):
        if name in excluded or name in equivalent:
            continue
        if code is None:
            counts["unchecked"] += 1
        elif code in KILLED:
            counts["killed"] += 1
        elif code in TIMEOUT:
            counts["timeout"] += 1
        else:
            kind = "survived" if code in SURVIVED else "no tests" if code in NO_TESTS else "other"
            counts[kind] += 1
            open_.append(f"  {name}  (exit {code})")
    scored = len(verdicts) - len(excluded) - len(equivalent)
    killed = counts["killed"] + counts["timeout"]
    print(f"{args.file}: {len(verdicts)} mutants, {len(excluded)} excluded (message text only),")
    tally = ", ".join(f"{v} {k}" for k, v in counts.items())
    print(f"  {len(equivalent)} equivalent, {scored} scored: {tally}")
    if scored:
        print(f"  score: {killed} / {scored} killed = {100 * killed / scored:.1f}%")
    if open_:
        print("not killed (triage: kill with a test, or list in tools/mutation_equivalent.txt):")
        print("\n".join(open_))
    return 0


if __name__ == "__main__":
    sys.exit(main())
