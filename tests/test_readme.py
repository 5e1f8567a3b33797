"""The README and docs/ stay true: the engine example runs, the test command is CI's, and every link resolves."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
DOCS = sorted((ROOT / "docs").glob("*.md"))

#: A fenced code block: its language tag and body.
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
#: Inline links and images, ``[text](target)`` / ``![alt](target "title")``; the target stops at a space or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: Reference-style link definitions, ``[label]: target``.
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
#: Targets that are not files of this repository.
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)


def code_blocks(text: str, language: str) -> list[str]:
    """The bodies of the fenced code blocks tagged ``language``."""
    return [body for tag, body in FENCE.findall(text) if tag.strip().lower() == language]


def relative_links(markdown: str) -> list[str]:
    """Every link target in Markdown text that points into the repository (fenced code and inline code skipped)."""
    text = FENCE.sub("", markdown)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = LINK.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not EXTERNAL.match(t) and not t.startswith("#")]


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of Markdown text (lower case, punctuation dropped, spaces to hyphens)."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", markdown), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_python_example_runs() -> None:
    """Each ```python block of the README runs as written, in a fresh namespace (it is sized to take seconds)."""
    blocks = code_blocks(README.read_text(encoding="utf-8"), "python")
    assert blocks, "the README has no ```python example"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine's fastest setting for these small matrices, and kind to a shared machine
    try:
        for i, source in enumerate(blocks):
            namespace: dict[str, object] = {"__name__": f"readme_example_{i}"}
            exec(compile(source, f"README.md (python block {i + 1})", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    # The example's own promises: a 2-D flow that gives one log-density per row and samples of shape (1000, 2).
    flow, samples = namespace.get("flow"), namespace.get("samples")
    if flow is not None and isinstance(samples, torch.Tensor):
        assert samples.shape == (1000, 2)
        assert torch.isfinite(samples).all()


def test_readme_test_command_is_ci_last_line() -> None:
    """The README's one-command test set-up ends with exactly the command .ci/run runs last."""
    ci_lines = [line.strip() for line in CI_SCRIPT.read_text(encoding="utf-8").splitlines() if line.strip()]
    ci_command = ci_lines[-1]
    assert "pytest" in ci_command, f".ci/run's last line is not the test command: {ci_command!r}"
    commands = [
        line.strip()
        for body in code_blocks(README.read_text(encoding="utf-8"), "bash")
        for line in body.splitlines()
        if "pytest" in line
    ]
    assert len(commands) == 1, f"expected one test command in the README's bash blocks, found {commands}"
    readme_command = commands[0].split("&&")[-1].strip()
    assert readme_command == ci_command
    # Both set-up commands pin the torch build CI installs.
    setups = [
        line
        for body in code_blocks(README.read_text(encoding="utf-8"), "bash")
        for line in body.splitlines()
        if line.startswith("python3 -m venv .venv")
    ]
    assert len(setups) == 2 and all("pip install torch==2.13.0" in line for line in setups), setups


@pytest.mark.parametrize("document", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document: Path) -> None:
    """Every relative link or image in README.md and docs/*.md names a file or folder that exists, and every
    ``#anchor`` into a Markdown file (or within the document) names one of its headings."""
    text = document.read_text(encoding="utf-8")
    missing = []
    for target in relative_links(text) + re.findall(r"\]\((#[^)\s]+)\)", FENCE.sub("", text)):
        path, _, anchor = unquote(target).partition("#")
        resolved = (document.parent / path).resolve() if path else document
        if not resolved.exists():
            missing.append(target)
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            missing.append(target)
    assert not missing, f"{document.relative_to(ROOT)} has links to missing files or headings: {missing}"


def test_link_extraction() -> None:
    """The link finder sees inline links, images and references, and skips code, anchors and URLs."""
    sample = (
        'See [a](docs/a.md#x) and ![b](img.png "title") and [c](https://example.com) and [d](#local).\n'
        "`[e](not-a-link.md)`\n"
        "```bash\n[f](inside-code.md)\n```\n"
        "[g]: ref.md\n"
    )
    assert relative_links(sample) == ["docs/a.md#x", "img.png", "ref.md"]
    headings = "# The `monoflow` command\n```python\n# not a heading\n```\n### 9.2 1-D fitting (Figure 4)\n"
    assert anchors(headings) == {"the-monoflow-command", "92-1-d-fitting-figure-4"}
