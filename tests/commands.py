"""The shell lines of a cluster-launcher file, parsed, so that the cluster tests check structure
(which program runs, with which arguments and environment, in which order) rather than substrings.

A line such as `ulimit -n 65536; RAY_AUTH_MODE=token ray start --head --port=6379` is split with
shlex into simple commands at `;`, `&&`, `||` and `|`; each has its leading `NAME=value`
assignments (`env`), its words (`argv`) and its output redirection (`> file` or `>> file`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

SEPARATORS = {";", "&&", "||", "|", "&"}
REDIRECTS = {">", ">>"}
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)


@dataclass
class Command:
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    redirect: tuple[str, str] | None = None  # (">" or ">>", target)

    @property
    def program(self) -> str:
        """The program's name without its directory (`~/venv/bin/ray` -> `ray`)."""
        return self.argv[0].rsplit("/", 1)[-1] if self.argv else ""

    def is_(self, program: str, *sub: str) -> bool:
        """Runs `program` (any directory) with `sub` as its first arguments, e.g. is_("ray", "start")."""
        return self.program == program and self.argv[1 : 1 + len(sub)] == list(sub)

    def options(self) -> dict[str, str | bool]:
        """`--name=value` and `--name value` as {name: value}; a bare `--flag` as {flag: True}."""
        out: dict[str, str | bool] = {}
        args = self.argv[1:]
        for i, a in enumerate(args):
            if not a.startswith("--"):
                continue
            name, eq, value = a[2:].partition("=")
            out[name] = value if eq else (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else True)
        return out


def parse(line: str) -> list[Command]:
    """The simple commands of one shell line, in order."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    out, cur, tokens = [], Command(), list(lexer)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in SEPARATORS:
            out.append(cur)
            cur = Command()
        elif tok in REDIRECTS:
            cur.redirect = (tok, tokens[i + 1])
            i += 1
        elif not cur.argv and (m := _ASSIGNMENT.match(tok)):
            cur.env[m.group(1)] = m.group(2)
        else:
            cur.argv.append(tok)
        i += 1
    out.append(cur)
    return [c for c in out if c.argv or c.env]


def home(path: str) -> str:
    """`$HOME/x`, `${HOME}/x` and `~/x` name the same place: the `~/x` form."""
    return re.sub(r"^(\$HOME|\$\{HOME\})/", "~/", path)


def exports(script: str) -> dict[str, str]:
    """The variables a script's `export NAME=value` commands set (unquoted, in the `~/` form)."""
    out = {}
    for cmd in parse(script):
        if cmd.is_("export"):
            for word in cmd.argv[1:]:
                if m := _ASSIGNMENT.match(word):
                    out[m.group(1)] = home(m.group(2))
    return out
