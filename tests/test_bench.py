import json

import pytest
from helpers import tiny_bench

from tangshi_jax import bench
from tangshi_jax.config import ModelConfig
from tangshi_jax.devices import cpu_summary
from tangshi_jax.errors import run_cli


def test_flops_per_token_counts_every_product_three_times():
    config = ModelConfig(vocab_size=7179)
    forward = 2 * (100 + 128) * 4 * 128 + 2 * (128 + 128) * 4 * 128 + 2 * 128 * 7179
    assert bench.flops_per_token(config) == 3 * forward
    assert round(bench.flops_per_token(config) / 1e6, 1) == 7.0  # PERFORMANCE.md's 7.0 MFLOP per token
    tied = ModelConfig(vocab_size=7319, hidden=256, embed=128, tied=True)
    forward = 2 * (128 + 256) * 4 * 256 + 2 * (256 + 256) * 4 * 256 + 2 * 256 * 128 + 2 * 128 * 7319
    assert bench.flops_per_token(tied) == 3 * forward  # the head reads the 128-wide projection


@pytest.mark.slow  # trains three variants for timed windows
def test_bench_prints_the_table_and_writes_json(tmp_path, capsys):
    argv, out = tiny_bench(tmp_path)
    argv += ["--variants", "fused,plain,wavefront", "--profile", str(tmp_path / "profile")]
    assert run_cli(bench.main, argv) == 0
    table = capsys.readouterr().out
    assert "ceiling" in table and "training, plain" in table and "training, wavefront" in table
    assert "matrix products, XLA" in table and "matrix products, numpy's BLAS" in table
    assert list((tmp_path / "profile").glob("**/perfetto_trace.json.gz"))
    figures = json.loads(out.read_text())
    for key in (
        "train_tokens_per_s",
        "ceiling_tokens_per_s",
        "compile_s_train",
        "compile_s_eval",
        "sample_ms_1",
        "sample_ms_64",
        "sample_ms_1024",
        "sample_ms_64_rules",
        "peak_rss_mb",
        "machine",
    ):
        assert figures[key], key
    # Figures checked against what they are made of, not against themselves.
    windows = figures["train_window_tokens_per_s"]
    assert set(windows) == {"fused", "plain", "wavefront"} and all(len(rates) == 2 for rates in windows.values())
    for variant, rates in windows.items():  # the median of its own windows, each a plausible rate
        assert figures["variants_tokens_per_s"][variant] == pytest.approx(sorted(rates)[0] / 2 + sorted(rates)[1] / 2)
        assert all(rate > 0 for rate in rates), (variant, rates)  # (the ceiling bounds large shapes only)
    assert figures["train_tokens_per_s"] == pytest.approx(sum(windows["fused"]) / 2)  # the first variant's
    rates = figures["matmul_gflops_by_backend"]
    assert figures["matmul_gflops"] == max(rates["xla"]["all"], rates["numpy"]["all"]) > 0
    per_token = figures["flops_per_token"]
    assert figures["ceiling_tokens_per_s"] == pytest.approx(figures["matmul_gflops"] * 1e9 / per_token)
    assert 0 < figures["padded_share"] < 1 and figures["val_tokens_per_s"] > 0
    for kind in ("train", "eval"):  # the compile time of a kind is its programs' times summed
        assert figures[f"compile_s_{kind}"] == pytest.approx(sum(figures["compile_s"][kind].values()))
    assert figures["model"]["hidden"] == 128 and figures["model"]["embed"] == 100  # the original's, by default


def test_an_unknown_variant_is_named_with_the_choices(capsys):
    assert run_cli(bench.main, ["--variants", "fused,fast"]) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'fast'" in err and "before" in err


def test_the_machine_line_names_the_processor_and_its_vector_width():
    """A CPU run's minutes compare only with a run on the same kind of processor (README), so
    train's platform line and bench's machine row say which, from /proc/cpuinfo."""
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 {}\n\nprocessor\t: 1\n"
    assert cpu_summary(x86.format("avx avx2 fma"), 2, "x86_64") == "AMD EPYC 7B13, 2 cores, AVX2 without AVX-512"
    assert cpu_summary(x86.format("avx2 avx512f avx512bw"), 2, "x86_64").endswith(", AVX-512")
    assert cpu_summary(x86.format("avx"), 4, "x86_64").endswith("4 cores, no AVX2")
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n"
    assert cpu_summary(arm, 8, "aarch64") == "aarch64, 8 cores"
    assert cpu_summary("", 10, "arm") == "arm, 10 cores"  # no /proc/cpuinfo (macOS)
