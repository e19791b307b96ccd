"""Every `--flag` the README and the docs it links mention exists on the verb it is shown
with (and a flag in prose exists on some verb): a renamed or removed option cannot leave
the documentation behind."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from workflows.cli import VERBS, verb_module

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--(?:\[no-\])?([a-z][a-z0-9-]*)")
# Flags of other programs that the docs quote (pip, pytest, ray, mlflow, curl, ssh, ...).
OTHER_TOOLS = {"variants", "world", "sizes", "quick", "min-len",  # bench/ scripts' own options
               "google-python",
               "help", "version", "upgrade", "extra-index-url", "index-url", "find-links",
               "durations", "dist", "head", "block", "address", "node-ip-address",
               "port", "num-cpus", "num-gpus", "dashboard-host", "dashboard-port",
               "env-manager", "host", "model-uri", "no-conda", "workers", "gpu", "threads",
               "clock", "device", "precision", "peak-tflops", "rounds", "force", "yes",
               "name", "type", "value", "region", "output", "query", "profile", "restart",
               "include-dashboard", "disable-usage-stats", "serve-artifacts",
               "backend-store-uri", "artifacts-destination", "app-name", "no-restart",
               "tags", "instance-ids", "secret-id", "with-decryption", "overwrite",
               "safe-serialization", "upload", "image", "file", "namespace", "context",
               "from-literal", "set", "values", "create-namespace", "wait", "timeout",
               "version-id", "bucket", "key", "body", "data", "json", "cluster-name",
               "no-config-cache", "keep-min-workers", "min-workers", "max-workers",
               "python", "constraint", "no-deps", "require-hashes", "only-binary",
               "strip-extras", "generate-hashes", "allow-unsafe", "pre", "system",
               "target", "platform", "abi", "implementation", "no-binary", "quiet",
               "verbose", "dry-run", "all", "runtime-env-json", "working-dir",
               "submission-id", "entrypoint-num-cpus", "no-wait", "follow", "log-style",
               "log-color", "storage", "temp-dir", "plasma-directory", "object-store-memory",
               "resources", "labels", "node-name", "ray-client-server-port",
               "redis-password", "bind", "reload", "listen", "tls", "cert", "insecure",
               "location", "local-port", "ssh-key", "user", "identity", "count",
               "instance-type", "security-group-ids", "subnet-id", "key-name",
               "iam-instance-profile", "block-device-mappings", "user-data", "filters",
               "owners", "image-id", "description", "policy-document", "role-name",
               "policy-arn", "assume-role-policy-document", "instance-profile-name",
               "group-name", "vpc-id", "group-id", "protocol", "cidr", "source-group",
               "ip-permissions", "zone", "tag-specifications", "launch-template",
               "capacity-reservation-specification", "placement", "network-interfaces",
               "ipv6", "e", "m", "n", "k", "x", "q", "s",
               "no-x", "old-name"}  # placeholders of docs/design.md

COMMAND = re.compile(r"(?:\$\s+)?(?:[A-Z_]+=\S*\s+)*bertflow\s+([A-Za-z][A-Za-z-]*)(.*)")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of `parser` and of its sub-verbs (`registry list`, `prep rerun`)."""
    found: set[str] = set()
    for action in parser._actions:
        found.update(s[2:] for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


OPTIONS = {verb: _options(verb_module(verb).build_parser()) for verb in VERBS}
ANY_VERB = set().union(*OPTIONS.values())


def _docs() -> list[Path]:
    """README.md and every docs/*.md it links to."""
    readme = ROOT / "README.md"
    linked = {ROOT / m for m in re.findall(r"\]\((docs/[\w.-]+\.md)", readme.read_text())}
    return [readme, *sorted(p for p in linked if p.is_file())]


def _code(text: str) -> list[str]:
    """The fenced blocks (backslash continuations joined) and inline spans of a page."""
    blocks = [re.sub(r"\\\n\s*", " ", b) for b in re.findall(r"```[^\n]*\n(.*?)```", text,
                                                            flags=re.S)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return blocks + re.findall(r"`([^`\n]+)`", prose)


def _commands(text: str) -> list[tuple[str, str]]:
    """(verb, the rest of the command) for each command `bertflow VERB ...` in code blocks
    and spans: at the start of a command (after `$ `, variables, `&&`, `;`, a pipe), a
    comment cut off first."""
    out = []
    for code in _code(text):
        for line in code.splitlines():
            line = re.split(r"(?:^|\s)#", line)[0]
            for part in re.split(r"&&|;|\|", line):
                m = COMMAND.match(part.strip())
                if m:
                    out.append((m.group(1), m.group(2)))
    return out


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.name)
def test_every_flag_a_doc_shows_exists_on_its_verb(doc):
    text = doc.read_text()
    problems = []
    for verb, rest in _commands(text):
        if verb not in OPTIONS:
            if not verb.isupper():  # VERB: a placeholder
                problems.append(f"bertflow {verb}: no such verb")
            continue
        known = OPTIONS[verb] | (ANY_VERB if verb == "submit" else set())
        for flag in FLAG.findall(rest):
            if flag not in known and f"no-{flag}" not in known:
                problems.append(f"bertflow {verb} --{flag}")
    assert not problems, f"{doc.name}: {sorted(set(problems))}"


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.name)
def test_every_flag_named_in_prose_exists_somewhere(doc):
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", doc.read_text(), flags=re.S))
    unknown = {f for span in spans if "bertflow" not in span for f in FLAG.findall(span)
               if f not in ANY_VERB and f not in OTHER_TOOLS}
    assert not unknown, f"{doc.name}: {sorted(unknown)}"


def test_the_readme_links_the_docs_it_moved_out():
    text = (ROOT / "README.md").read_text()
    for doc in ("sweeps", "cluster", "serving", "security", "benchmarks", "contributing",
                "data-formats"):
        assert f"docs/{doc}.md" in text, doc
    assert "make quickstart" in text and "make test" in text
