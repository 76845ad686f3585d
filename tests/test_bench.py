"""kuaida.bench: prompts, agreement measures, report writers (fast tier: no real model)."""
from __future__ import annotations

import json

import pytest

from kuaida.bench.latency import (COLUMNS, REFERENCE, add_speedups, greedy_prefix_agreement, matching_prefix,
                                  parse_variants, result_row, teacher_forced_agreement)
from kuaida.bench.peers import TokenClock, decode_rate
from kuaida.bench.prompts import dialogue_prompts, window_to_messages
from kuaida.bench.report import (Column, cell, cpu_model, make_report, markdown, rich_table, write_json,
                                 write_markdown)
from kuaida.errors import InvalidArgumentError


# -- prompts -------------------------------------------------------------------------------------
def test_prompts_are_deterministic_for_a_seed():
    assert dialogue_prompts(6, seed=3) == dialogue_prompts(6, seed=3)
    assert dialogue_prompts(6, seed=3) != dialogue_prompts(6, seed=4)


def test_prompts_alternate_and_end_on_a_user_turn():
    prompts = dialogue_prompts(20, seed=0)
    assert len(prompts) == 20
    for messages in prompts:
        assert len(messages) in (1, 3, 5, 7)
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"]
        assert all(m["content"].strip() for m in messages)


def test_window_must_end_on_a_user_turn():
    with pytest.raises(ValueError):
        window_to_messages(["hi", "hello"])


# -- agreement -----------------------------------------------------------------------------------
def test_teacher_forced_agreement_pools_positions():
    reference = [[1, 2, 3, 4], [5, 6]]
    assert teacher_forced_agreement(reference, reference) == 1.0
    assert teacher_forced_agreement([[1, 2, 9, 4], [0, 6]], reference) == pytest.approx(4 / 6)
    assert teacher_forced_agreement([[9, 9, 9, 9], [9, 9]], reference) == 0.0


def test_teacher_forced_agreement_rejects_misaligned_lists():
    with pytest.raises(ValueError):
        teacher_forced_agreement([[1, 2]], [[1, 2, 3]])


def test_greedy_prefix_stops_at_the_first_difference():
    assert matching_prefix([1, 2, 3, 4], [1, 2, 3, 4]) == 4
    assert matching_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 2  # the later match does not count
    assert matching_prefix([9, 2, 3, 4], [1, 2, 3, 4]) == 0
    assert matching_prefix([1, 2], [1, 2, 3, 4]) == 2


def test_greedy_prefix_agreement_counts_identical_outputs():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert greedy_prefix_agreement(reference, reference) == {"greedy_prefix": 1.0, "identical": 2}
    got = greedy_prefix_agreement([[1, 2, 3, 4], [5, 0, 7, 8]], reference)
    assert got == {"greedy_prefix": pytest.approx((1 + 1 / 4) / 2), "identical": 1}


# -- timing helpers ------------------------------------------------------------------------------
def test_decode_rate_excludes_the_first_token():
    assert decode_rate([10.0, 10.5, 11.0]) == pytest.approx(2.0)
    assert decode_rate([10.0]) == 0.0


def test_token_clock_ignores_the_prompt():
    clock = TokenClock()
    clock.put([[1, 2, 3]])  # transformers sends the prompt first
    clock.put([4])
    clock.put([5])
    clock.end()
    assert len(clock.times) == 2


def test_peak_rss_is_the_workers_own():
    """ru_maxrss survives exec: a worker started by a big parent would report the parent's peak."""
    import subprocess
    import sys

    ballast = bytearray(700 * 2**20)  # the parent's RSS: 700 MB more than the worker will ever touch
    code = "from kuaida.bench.latency import memory_mb; print(memory_mb()['peak_rss_mb'])"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout)
    assert 10 < child < 600 and len(ballast)


def test_parse_variants():
    assert parse_variants("all")[0] == "hf" and "llamacpp" in parse_variants("all")
    assert parse_variants("int8, fp32") == ["fp32", "int8"]  # table order
    with pytest.raises(InvalidArgumentError):
        parse_variants("fp32,fp64")


# -- report --------------------------------------------------------------------------------------
def worker_output(variant: str, tokens: list[list[int]], tok_s: float) -> dict:
    return {"variant": variant, "backend": f"test {variant}",
            "memory_mb": {"peak_rss_mb": 123.4, "rss_mb": 100.0, "rss_anon_mb": 60.0, "rss_file_mb": 40.0},
            "tokens": tokens, "next_tokens": tokens, "ttft_s": [0.1, 0.2, 0.3], "decode_tok_s": [tok_s] * 3}


@pytest.fixture
def latency_report():
    ref_tokens = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    reference = {**worker_output(REFERENCE, ref_tokens, 20.0), "prompt_ids": [[0], [0], [0]]}
    hf = worker_output("hf", [[1, 2, 3], [4, 5, 0], [0, 8, 9]], 8.0)
    rows = [result_row(hf, reference), result_row(reference, reference),
            result_row({"variant": "llamacpp", "skipped": "not installed"}, reference)]
    add_speedups(rows)
    return make_report("latency", "tiny", {"prompts": 3, "new_tokens": 3}, rows, threads=2,
                       command="kuaida bench latency")


def test_result_rows_have_the_documented_keys(latency_report):
    hf, fp32, skipped = latency_report["results"]
    assert set(fp32) >= {"variant", "ttft_ms", "decode_tok_s", "peak_rss_mb", "rss_mb", "rss_file_mb",
                         "agreement", "speedup_vs_hf"}
    assert set(fp32["ttft_ms"]) == set(fp32["decode_tok_s"]) == {"median", "p90"}
    assert set(fp32["agreement"]) == {"teacher_forced", "greedy_prefix", "identical"}
    assert fp32["ttft_ms"]["median"] == pytest.approx(200.0)
    assert fp32["speedup_vs_hf"] == 2.5 and hf["speedup_vs_hf"] == 1.0
    assert hf["agreement"]["identical"] == 1 and fp32["agreement"]["identical"] == 3
    assert skipped == {"variant": "llamacpp", "skipped": "not installed"}


def test_json_report_has_the_documented_keys(latency_report, tmp_path):
    write_json(latency_report, tmp_path / "out" / "latency.json")
    data = json.loads((tmp_path / "out" / "latency.json").read_text())
    assert set(data) >= {"machine", "model", "command", "settings", "results"}
    assert set(data["machine"]) >= {"cpu", "cores", "threads", "torch", "date"}
    assert data["command"] == "kuaida bench latency" and data["machine"]["threads"] == 2


def test_markdown_report_has_command_machine_table_and_skips(latency_report, tmp_path):
    write_markdown(latency_report, COLUMNS, tmp_path / "latency.md", "latency")
    text = (tmp_path / "latency.md").read_text()
    assert text == markdown(latency_report, COLUMNS, "latency")
    assert "`kuaida bench latency`" in text and latency_report["machine"]["cpu"] in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, one line per result
    assert "| fp32 | 200 |" in text and "2.50×" in text and "100.0%" in text
    assert "- llamacpp: not installed" in text


def test_cell_formats_nested_keys_and_marks_missing_values():
    row = {"a": {"b": 0.5}, "c": None}
    assert cell(row, Column("x", "a.b", lambda v: f"{v:.0%}")) == "50%"
    assert cell(row, Column("x", "c")) == "—"
    assert cell(row, Column("x", "a.z")) == "—"


def test_rich_table_has_a_row_per_result(latency_report):
    table = rich_table(latency_report, COLUMNS, "latency")
    assert table.row_count == 3 and len(table.columns) == len(COLUMNS)


# -- CLI wiring (the benchmark itself replaced by the fixture's report) ----------------------------
@pytest.fixture
def fake_run(monkeypatch, latency_report):
    calls = []

    def run_latency(model, variants, n_prompts, new_tokens, progress=None):
        calls.append((model, variants, n_prompts, new_tokens))
        return latency_report

    monkeypatch.setattr("kuaida.bench.latency.run_latency", run_latency)
    return calls


def test_bench_without_subcommand_runs_latency_with_defaults(fake_run):
    from typer.testing import CliRunner

    from kuaida.cli import app

    result = CliRunner().invoke(app, ["bench"])
    assert result.exit_code == 0, result.output
    assert fake_run == [("default", parse_variants("all"), 8, 64)]
    assert "kuaida bench latency" in result.output and "skipped llamacpp" in result.output


def test_bench_latency_writes_json_and_markdown(fake_run, tmp_path):
    from typer.testing import CliRunner

    from kuaida.cli import app

    args = ["bench", "latency", "--variants", "int8,fp32", "--prompts", "3", "--new-tokens", "16",
            "--json", str(tmp_path / "l.json"), "--md", str(tmp_path / "l.md")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert fake_run == [("default", ["fp32", "int8"], 3, 16)]
    assert json.loads((tmp_path / "l.json").read_text())["results"][1]["variant"] == "fp32"
    assert (tmp_path / "l.md").read_text().startswith("# kuaida bench latency")


def test_bench_latency_rejects_an_unknown_variant(fake_run):
    from typer.testing import CliRunner

    from kuaida.cli import app

    result = CliRunner().invoke(app, ["bench", "latency", "--variants", "fp64"])
    assert result.exit_code == 2 and "fp64" in result.output and fake_run == []


# -- end to end on a tiny model: every variant in its worker process -------------------------------
@pytest.fixture
def tiny_gguf_for_bench(make_hf_dir, tmp_path, monkeypatch):
    """The tiny Llama as an F32 GGUF, with room for chitchat prompts (its default window is 256)."""
    from conftest import write_llama_gguf

    monkeypatch.setenv("KUAIDA_CACHE", str(tmp_path / "cache"))  # the workers convert into it
    hf_dir = make_hf_dir("llama", tie_word_embeddings=False, max_position_embeddings=2048)
    return write_llama_gguf(hf_dir, tmp_path / "tiny.F32.gguf")


@pytest.mark.integration  # ~1 min: six worker processes, each importing torch and transformers
def test_latency_end_to_end_on_a_tiny_model(tiny_gguf_for_bench):
    from kuaida.bench.latency import VARIANTS, run_latency
    from kuaida.bench.peers import llamacpp_missing

    report = run_latency(str(tiny_gguf_for_bench), VARIANTS, n_prompts=2, new_tokens=4)
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == list(VARIANTS)
    assert report["settings"]["prompt_tokens"]["min"] > 0
    for variant in ("hf", "fp32", "bf16", "int8", "int4"):
        assert rows[variant]["ttft_ms"]["median"] > 0 and rows[variant]["decode_tok_s"]["median"] > 0
    # fp32 weights everywhere: transformers and kuaida fp32 agree with the reference token for token.
    assert rows["fp32"]["agreement"] == {"teacher_forced": 1.0, "greedy_prefix": 1.0, "identical": 2}
    assert rows["hf"]["agreement"]["teacher_forced"] == 1.0
    if llamacpp_missing():
        assert rows["llamacpp"]["skipped"] == llamacpp_missing()
    else:  # the GGUF is F32 too: same ids in, same argmax out (up to rare near-ties)
        assert rows["llamacpp"]["agreement"]["teacher_forced"] >= 0.75


def test_cpu_model_names_the_microarchitecture(tmp_path):
    """Two machines that both call themselves "AMD EPYC" must be told apart in a result file."""
    info = tmp_path / "cpuinfo"
    block = ("processor\t: {n}\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\n"
             "cpu MHz\t\t: 2596.138\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n\n")
    info.write_text(block.format(n=0) + block.format(n=1).replace("25", "26"))
    assert cpu_model(info) == "AMD EPYC (family 25, model 17, 2596 MHz, AVX-512 + BF16 + VNNI)"
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2\n")
    assert cpu_model(info) == "Some CPU (AVX2)"
    assert cpu_model(tmp_path / "missing")  # no cpuinfo: platform's answer, not a crash
