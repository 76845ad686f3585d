"""The terminal conversation behind `kuaida chat`: history, slash commands, streamed replies with speed."""
from __future__ import annotations

import sys
from typing import Any, TextIO

from rich.console import Console

from kuaida.bot import Bot
from kuaida.errors import KuaidaError

HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /quit"


class ChatSession:
    def __init__(self, bot: Bot, sampling: dict[str, Any], system: str | None, interactive: bool,
                 console: Console) -> None:
        self.bot, self.sampling, self.system = bot, sampling, system
        self.interactive, self.console = interactive, console
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def command(self, line: str) -> bool:
        """Handle a /command; -> False when the session should end."""
        name, _, arg = line.partition(" ")
        if name == "/quit":
            return False
        if name == "/reset":
            self.history.clear()
            self.console.print("[dim]conversation cleared[/]")
        elif name == "/system":
            self.system = arg.strip() or None
            self.history.clear()
            self.console.print(f"[dim]system prompt {'set' if self.system else 'cleared'}; conversation cleared[/]")
        else:
            self.console.print(f"[yellow]unknown command {name}[/]; {HELP}")
        return True

    def reply(self, user_text: str) -> None:
        self.history.append({"role": "user", "content": user_text})
        if self.interactive:
            sys.stdout.write("bot> ")
        pieces = []
        try:
            for piece in self.bot.stream(self.messages(), **self.sampling):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KuaidaError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            self.history.pop()
            sys.stdout.write("\n")
            self.console.print(f"[bold red]error:[/] {e}", highlight=False)
            return
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.history.append({"role": "assistant", "content": "".join(pieces)})
        s = self.bot.last_stats
        self.console.print(
            f"[dim]TTFT {s.ttft_s * 1000:.0f} ms · {s.decode_tok_s:.1f} tok/s · {s.completion_tokens} tokens · "
            f"prompt {s.prompt_tokens} ({s.cached_tokens} reused from cache)[/]", highlight=False)

    def run(self, stdin: TextIO) -> None:
        if self.interactive:
            self.console.print(f"[bold]kuaida chat[/] — {HELP}")
        while True:
            try:
                line = input("you> ") if self.interactive else stdin.readline()
            except EOFError:
                break
            if not self.interactive and not line:
                break  # end of piped input
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            self.reply(line)
