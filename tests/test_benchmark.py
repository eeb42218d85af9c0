"""The benchmarks run at a small size: bench_throughput prints its table with ratios and writes its rows;
check_determinism compares two same-seed runs; study_cells runs named cells of the sync study; metrics_backends
times our FID, KID and IS against torchmetrics'."""
import json
import subprocess
import sys
from pathlib import Path

import fedgan_utils as fu

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(tmp_path, *options):
    rows_path = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_throughput.py", "--ks", "1,2", "--steps", "2", "--ngf", "8", "--batch", "8",
         "--repeats", "1", "--device", "cpu", "--json", str(rows_path), *options],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result, json.loads(rows_path.read_text())


def test_benchmark_prints_ratios_and_writes_json_rows(tmp_path):
    result, rows = run_benchmark(tmp_path)
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "engine/loop" in line)
    assert "engine/ceiling" in header and "loop img/s" in header
    table = lines[lines.index(header) + 2:lines.index(header) + 4]
    assert [int(line.split()[0]) for line in table] == [1, 2]
    assert [set(r) for r in rows] == [{"K", "batch", "device", "conv_form", "conv_block_clients", "deterministic",
                                       "loop_img_s", "engine_img_s", "ceiling_img_s", "peak_mem_mb", "eager_img_s",
                                       "first_round_img_s", "forms_img_s", "maps_img_s", "loop_kernels_step",
                                       "engine_kernels_step", "ceiling_kernels_step"}] * 2
    for row, line in zip(rows, table):
        assert row["device"] == "cpu" and row["batch"] == 8 and row["peak_mem_mb"] is row["eager_img_s"] is None
        assert row["conv_form"] == "auto" and row["deterministic"] is True
        assert row["forms_img_s"] is row["maps_img_s"] is None
        assert min(row["loop_img_s"], row["engine_img_s"], row["ceiling_img_s"], row["first_round_img_s"]) > 0
        first_round = next(line for line in lines if line.startswith(f"K={row['K']}: the engine's first round"))
        assert f"{row['first_round_img_s'] / row['engine_img_s']:.2f}x the engine" in first_round
        ratio = float(line.split()[4])  # the printed engine/loop is the ratio of the written figures
        assert abs(ratio - row["engine_img_s"] / row["loop_img_s"]) < 0.006


def test_batched_clients_launch_as_many_kernels_as_one_model_whatever_their_number(tmp_path):
    """vmap runs all clients in each kernel; the per-client loop launches each kernel once per client."""
    _, (one, two) = run_benchmark(tmp_path, "--client-map", "vmap", "--ks", "2,4")  # K=1 takes vmap's own path
    assert one["engine_kernels_step"] == two["engine_kernels_step"]
    assert one["ceiling_kernels_step"] == two["ceiling_kernels_step"]
    assert two["loop_kernels_step"] > 1.5 * one["loop_kernels_step"]
    assert two["engine_kernels_step"] < two["loop_kernels_step"]


def test_without_the_loop_the_benchmark_times_the_engine_alone(tmp_path):
    result, rows = run_benchmark(tmp_path, "--no-loop", "--ks", "2")
    assert rows[0]["loop_img_s"] is None and rows[0]["loop_kernels_step"] is None and rows[0]["engine_img_s"] > 0
    line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["2"])
    assert line.split()[1] == "-" and line.split()[4] == "-"  # no loop figure, no engine/loop ratio


def test_other_conv_forms_and_client_maps_are_timed_alongside_the_engine_and_compared_to_it(tmp_path):
    result, rows = run_benchmark(tmp_path, "--client-map", "vmap", "--compare-forms", "loop,block:2",
                                 "--compare-maps", "streams")
    lines = [line for line in result.stdout.splitlines() if line.startswith("K=") and "the engine with" in line]
    assert len(lines) == 6  # two forms and a client map at K = 1 and 2
    for row in rows:
        assert set(row["forms_img_s"]) == {"loop", "block:2"} and min(row["forms_img_s"].values()) > 0
        assert set(row["maps_img_s"]) == {"streams"} and row["maps_img_s"]["streams"] > 0
        assert row["loop_img_s"] != row["forms_img_s"]["loop"]  # the reference loop is timed apart from the form
        line = next(line for line in lines if line.startswith(f"K={row['K']}: the engine with conv_form block:2:"))
        assert line.split("img/s, ")[1].startswith(f"{row['forms_img_s']['block:2'] / row['engine_img_s']:.2f}x")
        line = next(line for line in lines if line.startswith(f"K={row['K']}: the engine with client_map streams:"))
        assert line.endswith(f"{row['maps_img_s']['streams'] / row['loop_img_s']:.2f}x the loop")


def test_determinism_check_trains_each_setting_twice_and_finds_a_cpu_run_reproducible(tmp_path):
    rows_path = tmp_path / "determinism.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/check_determinism.py", "--clients", "3", "--steps", "2", "--ngf", "8",
         "--device", "cpu", "--json", str(rows_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(rows_path.read_text())
    assert {(r["deterministic"], r["conv_form"]) for r in rows} == {(d, f) for d in (True, False)
                                                                   for f in ("grouped", "block")}
    assert all(r["equal"] and r["max_diff"] == 0 for r in rows)
    assert sum("equal: True" in line for line in result.stdout.splitlines()) == 4


def test_study_cells_runs_the_named_cells_from_each_seed_scored_by_one_classifier_and_refuses_bad_names(tmp_path):
    out = tmp_path / "cells.json"
    study = [sys.executable, "benchmarks/study_cells.py", "--preset", "smoke", "--device", "cpu"]
    result = subprocess.run([*study, "--cells", "FedAvg / iid", "half, uniform / iid", "--seeds", "0", "1",
                             "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    found = json.loads(out.read_text())
    assert [(row["cell"], row["seed"]) for row in found["rows"]] == [
        ("FedAvg / iid", 0), ("FedAvg / iid", 1), ("half, uniform / iid", 0), ("half, uniform / iid", 1)]
    full, full_1, half, _ = found["rows"]
    assert (full["clients"], half["clients"]) == ("4/4", "2/4")
    assert half["images"] == full["images"] > 0  # half the clients for twice the rounds: the same images
    assert full_1["fid"] != full["fid"]  # another seed, another run
    assert [point["round"] for point in found["curves"]["half, uniform / iid"]["0"]][-1] == 4
    assert found["curves"]["FedAvg / iid"]["1"][-1]["fid"] == full_1["fid"]
    assert 0.5 < found["reference"]["classifier_test_accuracy"] <= 1
    assert f"cond_acc {found['reference']['cond_acc']:.4g}" in result.stdout
    listed = subprocess.run([*study, "--preset", "cpu", "--list"], cwd=REPO, capture_output=True, text=True,
                            timeout=60).stdout
    half_epoch = next(line for line in listed.splitlines() if line.startswith("half epoch / iid"))
    assert "'local_epochs': 0.5" in half_epoch and f"'rounds': {2 * fu.preset('cpu').rounds}" in half_epoch
    wrong = subprocess.run([*study, "--cells", "FedAvg / IID"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "['FedAvg / IID'] not known" in wrong.stderr and "'FedAvg / iid'" in wrong.stderr
    twice = subprocess.run([*study, "--seeds", "1", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert twice.returncode == 2 and "--seeds [1, 1]: distinct integers >= 0 allowed" in twice.stderr


def test_the_laptop_preset_benchmark_lists_its_candidates_and_refuses_unknown_ones():
    script = [sys.executable, "benchmarks/laptop_preset.py"]
    listed = subprocess.run([*script, "--list"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0
    lines = {line.split("  ")[0].strip(): line for line in listed.stdout.splitlines()}
    assert "'client_fraction': 0.2, 'rounds': 30" in lines["fifth x30"]  # the one the cpu preset took
    assert (fu.preset("cpu").client_fraction, fu.preset("cpu").rounds) == (0.2, 30)
    wrong = subprocess.run([*script, "--candidates", "fifth x31"], cwd=REPO, capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 2 and "['fifth x31'] not known" in wrong.stderr and "'fifth x30'" in wrong.stderr


def test_the_metric_backends_benchmark_times_both_and_agrees_on_fid():
    result = subprocess.run([sys.executable, "benchmarks/metrics_backends.py", "--n", "300", "--features", "8",
                             "--repeat", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.splitlines() if line.strip().startswith("300 |")]
    assert [row[1].strip() for row in rows] == ["FID", "KID", "IS"]
    fid = rows[0]
    assert float(fid[2]) > 0 and float(fid[3]) > 0 and float(fid[5].split()[0]) < 1e-6  # the same FID, both timed
