"""Repository invariants: CI runs exactly the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_commands = [c for c in _readme_commands() if "pytest" in c]
    assert len(test_commands) == 1, test_commands
    readme_test = test_commands[0].split("&&")[-1].strip()
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ci_lines[-1] == readme_test
    torch_first = re.compile(r"pip install (--quiet )?torch==2\.13\.0")
    assert torch_first.search(test_commands[0]) and torch_first.search("\n".join(ci_lines))


def test_readme_main_job_runs_generate_on_the_default():
    # the set-up-and-run command of the quick start (other sections show generate on other models)
    main_job = [c for c in _readme_commands() if "steerdiff generate" in c and "pip install" in c]
    assert len(main_job) == 1 and main_job[0].rstrip().endswith("steerdiff generate")
