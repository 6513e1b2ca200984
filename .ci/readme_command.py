"""Prints one of the README's two commands, verbatim, for .ci/run.

  python .ci/readme_command.py test      # the block after "<!-- ci: test -->"
  python .ci/readme_command.py install   # the block after "<!-- ci: install -->"

CI runs the README's test command exactly as written, so the two can never
drift apart (a README command that fails on a fresh clone fails CI).
"""
import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def command(name: str) -> str:
  text = README.read_text()
  m = re.search(rf"<!-- ci: {re.escape(name)} -->\s*```bash\n(.*?)```", text, flags=re.S)
  if not m:
    raise SystemExit(f"README.md has no '<!-- ci: {name} -->' bash block")
  lines = [l for l in m.group(1).splitlines() if l.strip() and not l.lstrip().startswith("#")]
  if len(lines) != 1:
    raise SystemExit(f"README.md's '{name}' block must be one command line, got {len(lines)}")
  return lines[0]


if __name__ == "__main__":
  print(command(sys.argv[1]))
