"""Next-turn tokens written ahead (kuaida.engine.scheduler) on or off: two `kuaida serve` processes on the
default model (int8), the same multi-turn chitchat conversations on both, turns taking turns between the
servers (which goes first alternates by conversation), each reply followed by a user's think time (the
feature works while the server is idle; a client that answers within 50 ms gets no benefit and pays
nothing).

    python benchmarks/scripts/next_turn_ab.py [CONVERSATIONS] [THINK_S] [--turns N] [--kb] [--type-ahead]
                                              [--env-off VAR=VALUE] [--md P] [--json P]
    # defaults: 5 conversations of 10 turns, 1.0 s think time

--env-off VAR=VALUE: both servers as `kuaida serve` starts, the second ("off") with VAR=VALUE in its
environment, e.g. KUAIDA_NO_PREFILL_KERNEL=1 (prefill attention through SDPA instead of the kernel).

--type-ahead: both servers as `kuaida serve` starts (next-turn tokens on); the client of the first
("typed") also sends drafts of each message while its user types, the first message's too (POST
/v1/chat/drafts at a third, two thirds and 0.25 s before the end of the think time:
kuaida.bench.load.typing_drafts), the other's does not. Use a think time of 2 s or more (a user typing a sentence).

--kb: conversations grounded in the shipped sample knowledge base instead (each turn one of its
customer questions, asked with `knowledge: {"base": "homehub"}`: the servers put the passages found
before each user message, and write the ~45 tokens up to the next turn's passages ahead; ~500 tokens a
turn: use --turns 5 to stay within the 4,096-token context).

Prints a Markdown table: per turn, the median time to first token of each server and the tokens each
prefilled. Results: benchmarks/results/next-turn.md.
"""
import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path

from kuaida.bench.kb import QUESTIONS_FILE, SAMPLE, load_questions, sample_path
from kuaida.bench.load import (
    SYSTEM_PROMPT,
    THREADS,
    LoadSettings,
    chat_stream,
    free_port,
    kuaida_command,
    serving,
    think_and_type,
    user_sides,
)
from kuaida.bench.report import command_line, machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("conversations", type=int, nargs="?", default=5)
    ap.add_argument("think_s", type=float, nargs="?", default=1.0)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--kb", action="store_true", help="grounded conversations on the sample base")
    ap.add_argument("--type-ahead", action="store_true", help="compare a client that sends typing drafts")
    ap.add_argument("--env-off", metavar="VAR=VALUE", help="compare servers alike but for this variable")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    turns = args.turns
    settings = LoadSettings(turns=turns)
    names = {"typed": [], "untyped": []} if args.type_ahead else {"on": [], "off": ["--no-prefill-next-turn"]}
    envs: dict[str, dict[str, str]] = {}
    if args.env_off:
        var, sep, value = args.env_off.partition("=")
        if not sep or not var or args.type_ahead:
            raise SystemExit("--env-off takes VAR=VALUE, and not with --type-ahead")
        names, envs = {"on": [], "off": []}, {"off": {var: value}}
    extra = None
    if args.kb:  # 61 questions: conversations of `turns` consecutive ones, wrapping around
        questions = [q.question for q in load_questions(sample_path() / QUESTIONS_FILE)]
        conversations = [[questions[(i * turns + t) % len(questions)] for t in range(turns)]
                         for i in range(args.conversations)]
        extra = {"knowledge": {"base": SAMPLE}}
    else:
        conversations = user_sides(args.conversations, turns)
    rows = {name: [[] for _ in range(turns)] for name in names}  # per turn: (ttft ms, prefilled tokens)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        kb_args = []
        if args.kb:
            from kuaida.knowledge import create_kb

            create_kb(SAMPLE, root=Path(tmp)).add([str(p) for p in sample_path().iterdir()
                                                   if p.name != QUESTIONS_FILE])
            kb_args = ["--kb", SAMPLE, "--kb-dir", tmp]
        targets = {}
        for name, flags in names.items():  # both servers at once, each with its own session database
            port = free_port()
            db = ["--db", f"{tmp}/{name}.db"]
            cmd = [*kuaida_command("default", "int8", True, port), *db, *flags, *kb_args]
            targets[name] = stack.enter_context(serving(name, cmd, port, "/health", Path(tmp),
                                                        env=envs.get(name)))
        for target in targets.values():  # first-call allocations, untimed
            chat_stream(target, [{"role": "user", "content": "Hi!"}], settings, 1)
        for i, user in enumerate(conversations, 1):
            history = {name: [{"role": "system", "content": SYSTEM_PROMPT}] for name in names}
            # Which server goes first alternates by conversation (the first one's request follows the other's
            # think time, the second's its own: no order effect left in the medians).
            order = list(targets.items())[::1 if i % 2 else -1]
            for turn, text in enumerate(user):
                for name, target in order:
                    # The user reads the last reply (this server's, or the other's at turn 1) and types.
                    think_and_type(target, history[name], text, args.think_s, name == "typed", extra)
                    history[name].append({"role": "user", "content": text})
                    reply = chat_stream(target, history[name], settings, turn + 1, extra)
                    if not reply.ok:
                        raise SystemExit(f"{name}, conversation {i}, turn {turn + 1}: {reply.problem()}")
                    history[name].append({"role": "assistant", "content": reply.text})
                    rows[name][turn].append((reply.ttft_s * 1000, reply.prompt_tokens - reply.cached_tokens))
            print(f"conversation {i}/{len(conversations)} done", flush=True)
    report = {"command": command_line(), "machine": machine_info(THREADS),
              "conversations": args.conversations, "think_s": args.think_s, "knowledge": args.kb,
              "type_ahead": args.type_ahead, "env_off": args.env_off, "turns": []}
    for turn in range(turns):
        report["turns"].append({"turn": turn + 1, **{
            name: {"ttft_ms_each": [round(t, 1) for t, _ in rows[name][turn]],
                   "prefilled_each": [n for _, n in rows[name][turn]]} for name in names}})
    text = to_markdown(report)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def to_markdown(report: dict) -> str:
    m = report["machine"]
    machine = (f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, "
               f"{m['date']}, load average {' / '.join(map(str, m['load_average']))}, kuaida {m['kuaida']} "
               f"({m['git']})  ")
    n = len(report["turns"])
    typed = report.get("type_ahead")
    on_key, off_key = ("typed", "untyped") if typed else ("on", "off")
    env_off = report.get("env_off")
    title = ("Drafts while typing (POST /v1/chat/drafts): sent / not sent" if typed
             else f"`kuaida serve` / the same with {env_off}" if env_off
             else "Next-turn tokens written ahead: on / off")
    on_col, off_col = (("with drafts", "without") if typed else ("as served", env_off) if env_off
                       else ("written ahead", "off"))
    lines = [f"# {title}", "", machine, f"Command: `{report['command']}`  ",
             (f"{report['conversations']} conversations x {n} turns on each server, {report['think_s']} s "
              "think time after every reply; medians over the conversations."
              + (" Grounded: each turn a question about the sample knowledge base, asked with it."
                 if report.get("knowledge") else "")
              + (" Both servers as `kuaida serve` starts; the first one's client posts three drafts of "
                 "each message (a third, two thirds of the words, and all but the last "
                 "0.25 s before sending), the other's none." if typed else "")), "",
             (f"| turn | TTFT ms, {on_col} | prefilled tokens | TTFT ms, {off_col} | prefilled tokens "
              f"| {off_col} / {on_col} |"),
             "| --- | --- | --- | --- | --- | --- |"]
    ratios = []
    for row in report["turns"]:
        on, off = row[on_key], row[off_key]
        ton, toff = statistics.median(on["ttft_ms_each"]), statistics.median(off["ttft_ms_each"])
        pon, poff = statistics.median(on["prefilled_each"]), statistics.median(off["prefilled_each"])
        ratio = toff / ton
        lines.append(f"| {row['turn']} | {ton:.0f} | {pon:.0f} | {toff:.0f} | {poff:.0f} | {ratio:.2f}x |")
        if row["turn"] > 1:
            ratios += [b / a for a, b in zip(on["ttft_ms_each"], off["ttft_ms_each"])]
    lines += ["", (f"Turns 2-{n}: median {off_col} / {on_col} TTFT over every (turn, conversation) pair "
                   f"{statistics.median(ratios):.2f}x ({len(ratios)} pairs).")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
