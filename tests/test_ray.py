"""The Ray engine (``--engine ray``) against the local engine, on one local Ray instance with two
CPUs: ``evaluate`` gives the same ``results.json`` numbers and ``explain`` the same maps, overlays
and ``results.json``, bit for bit (the engine runs the local engine's batches); a worker that dies
mid-run loses and repeats no image; the map shards hold what the per-image files hold; Ctrl-C
stops a run and the Ray instance it started; the local engine never imports Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from PIL import Image

from agf_onnx import cli
from agf_onnx.distributed import RayEngine
from agf_onnx.evaluate import ImageScores, Tally, summary
from agf_onnx.runtime.outputs import read_shard
from tools import make_benchmark

from . import models

# Ray Data's own context warns about its renamed settings when it is copied to the workers
pytestmark = pytest.mark.filterwarnings(r"ignore:`use_\w+` is deprecated:DeprecationWarning")
NO_RAY = "ray is not installed (pip install 'agf-onnx[ray]')"


@pytest.fixture(scope="module")
def engine():
    """One local Ray instance (2 CPUs) for the module, started and stopped as the CLI does; the
    CLI's runs find it running and use it."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    with RayEngine(workers=2) as started:
        assert started.owned and ray.is_initialized()
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:"), "loopback only"
        assert ray.cluster_resources()["CPU"] == 2
        yield started
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny generated benchmark (digits on textured canvases, masks) and a seeded VGG-style model;
    one unreadable file among the images to explain."""
    folder = tmp_path_factory.mktemp("bench")
    make_benchmark.generate(folder / "data", 10, seed=1, size=48, source="digits")
    onnx.save(models.export(models.seeded(models.VGGish(classes=10, image=48), image=48), 48), folder / "vgg.onnx")
    images = folder / "images"
    images.mkdir()
    for path in sorted((folder / "data" / "images").iterdir()):
        (images / path.name).write_bytes(path.read_bytes())
    (images / "00003b.png").write_text("not an image")
    return folder


def dying_after_one_batch(monkeypatch, marker) -> None:
    """Make the first Ray worker to start its second batch exit abruptly (as a killed process does),
    once (the ``marker`` file records it): the engine's actor classes replaced by subclasses made
    here, which cloudpickle ships to the workers by value, so no hook lives in the package."""

    def dying(worker: type) -> type:
        class Dying(worker):
            def __call__(self, batch):
                self.batches = getattr(self, "batches", 0) + 1
                if self.batches == 2:
                    try:
                        open(marker, "x").close()
                    except FileExistsError:  # this fault has happened already
                        pass
                    else:
                        os._exit(17)
                return super().__call__(batch)

        return Dying

    monkeypatch.setattr(RayEngine, "explain_worker", dying(RayEngine.explain_worker))
    monkeypatch.setattr(RayEngine, "evaluate_worker", dying(RayEngine.evaluate_worker))


def _numbers(path) -> dict:
    """results.json without the timings and the settings that name the engine."""
    results = json.loads(path.read_text())
    results.pop("seconds"), results.pop("settings")
    for entry in results["methods"].values():
        entry.pop("explain_seconds")
    return results


def test_evaluate_on_ray_gives_the_local_numbers_even_when_a_worker_dies(engine, bench, tmp_path, monkeypatch):
    common = ["evaluate", str(bench / "vgg.onnx"), str(bench / "data"), "--methods", "agf,lrp", "--preset",
              "symmetric", "--batch-size", "3", "-q"]
    assert cli.main([*common, "-o", str(tmp_path / "local")]) == 0
    # the first worker to start its second batch dies (4 batches on 2 workers: one of them has a second);
    # Ray reruns that batch on a fresh worker
    dying_after_one_batch(monkeypatch, str(tmp_path / "crashed"))
    assert cli.main([*common, "-o", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"]) == 0
    assert (tmp_path / "crashed").exists(), "the fault was injected"
    local, distributed = _numbers(tmp_path / "local" / "results.json"), _numbers(tmp_path / "ray" / "results.json")
    # a lost or repeated image would change the sums: the numbers are the local engine's, exactly
    assert distributed == local
    assert local["images"] == 10 and local["methods"]["agf"]["segmentation"]["images"] == 10
    settings = json.loads((tmp_path / "ray" / "results.json").read_text())["settings"]
    assert settings["engine"] == "ray" and settings["workers"] == 2 and settings["provider"] == "cpu"


def test_a_self_supervised_evaluate_on_ray_gives_the_local_numbers(engine, bench, tmp_path):
    """Algorithm 2 (--ssl-bank): each image's t and bank neighbour, and the scores of t's map."""
    import agf_onnx

    agf_onnx.bank(bench / "vgg.onnx", sorted((bench / "data" / "images").glob("*.png"))[:4],
                  output=tmp_path / "bank.npy", preset="symmetric")
    common = ["evaluate", str(bench / "vgg.onnx"), str(bench / "data"), "--methods", "agf", "--preset", "symmetric",
              "--ssl-bank", str(tmp_path / "bank.npy"), "--batch-size", "4", "-q"]
    assert cli.main([*common, "-o", str(tmp_path / "local")]) == 0
    assert cli.main([*common, "-o", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    local = _numbers(tmp_path / "local" / "results.json")
    assert _numbers(tmp_path / "ray" / "results.json") == local
    assert len(local["methods"]["agf"]["ssl"]["ssl_target"]) == 10
    neighbours = local["methods"]["agf"]["ssl"]["ssl_neighbour"]
    assert all(0 <= n < 4 for n in neighbours) and all(neighbours[i] != i for i in range(4)), \
        "the bank's own images find another image, never themselves"


def test_evaluate_on_ray_skips_an_unreadable_image_as_the_local_engine(engine, bench, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data.csv").write_text(f"file,label\n{bench / 'data' / 'images' / '00000.png'},1\nbroken.png,2\n")
    for name, engine_options in (("local", []), ("ray", ["--engine", "ray"])):
        code = cli.main(["evaluate", str(bench / "vgg.onnx"), str(tmp_path / "data.csv"), "-o", str(tmp_path / name),
                         "--methods", "gradient", "--batch-size", "1", "-q", *engine_options])
        error = capsys.readouterr().err
        assert code == 0 and "broken.png: not a readable image" in error and "(skipped)" in error
    assert _numbers(tmp_path / "ray" / "results.json") == _numbers(tmp_path / "local" / "results.json")
    assert json.loads((tmp_path / "ray" / "results.json").read_text())["images"] == 1


def _explain(bench, out, *options):
    return cli.main(["explain", str(bench / "vgg.onnx"), str(bench / "images"), "-o", str(out), "--preset",
                     "symmetric", "--top-k", "2", "--batch-size", "3", *options])


def test_explain_on_ray_writes_the_local_files(engine, bench, tmp_path, capsys):
    assert _explain(bench, tmp_path / "local") == 1  # one unreadable file
    assert _explain(bench, tmp_path / "ray", "--engine", "ray") == 1
    printed = capsys.readouterr()
    assert "engine: ray (a local Ray instance), 2 worker(s), provider cpu" in printed.out
    assert printed.err.count("00003b.png: not a readable image") == 2
    local = json.loads((tmp_path / "local" / "results.json").read_text())["images"]
    distributed = json.loads((tmp_path / "ray" / "results.json").read_text())["images"]
    assert distributed == local and len(local) == 11
    assert [entry["error"] is not None for entry in local] == [n == 4 for n in range(11)]
    for entry in local[:4] + local[5:]:
        np.testing.assert_array_equal(np.load(tmp_path / "ray" / entry["heatmap"]),
                                      np.load(tmp_path / "local" / entry["heatmap"]))
        assert np.load(tmp_path / "ray" / entry["heatmap"]).shape == (2, 48, 48)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ray" / entry["overlay"])),
                                      np.asarray(Image.open(tmp_path / "local" / entry["overlay"])))
    assert (tmp_path / "ray" / "index.html").read_text() == (tmp_path / "local" / "index.html").read_text()


def test_a_killed_worker_loses_and_repeats_no_image_in_the_shards(engine, bench, tmp_path, monkeypatch):
    assert _explain(bench, tmp_path / "files") == 1
    dying_after_one_batch(monkeypatch, str(tmp_path / "crashed"))  # 4 batches on 2 workers: one gets a second
    assert _explain(bench, tmp_path / "shards", "--engine", "ray", "--output-format", "npz-shards") == 1
    assert (tmp_path / "crashed").exists(), "the fault was injected"
    results = json.loads((tmp_path / "shards" / "results.json").read_text())
    assert results["images"] == 11 and results["explained"] == 10
    assert [failure["image"].endswith("00003b.png") for failure in results["failed"]] == [True]
    shards = [read_shard(tmp_path / "shards" / shard["file"]) for shard in results["shards"]]
    indices = np.concatenate([shard["index"] for shard in shards])
    assert sorted(indices) == [n for n in range(11) if n != 4], "every image exactly once"
    _same_as_files(shards, tmp_path / "files")


def _same_as_files(shards: list[dict], files) -> None:
    """Each shard row holds the image's maps, classes and probabilities as the per-image files do."""
    entries = json.loads((files / "results.json").read_text())["images"]
    for shard in shards:
        for n, index in enumerate(shard["index"]):
            entry = entries[index]
            assert shard["image"][n] == entry["image"]
            np.testing.assert_array_equal(shard["heatmaps"][n], np.load(files / entry["heatmap"]))
            assert list(shard["classes"][n]) == [e["class"] for e in entry["explained"]]
            np.testing.assert_allclose(shard["probabilities"][n], [e["probability"] for e in entry["explained"]],
                                       rtol=1e-6)


def test_parquet_shards_hold_the_same_maps(bench, tmp_path):
    pytest.importorskip("pyarrow", reason=NO_RAY)
    assert _explain(bench, tmp_path / "files") == 1
    assert _explain(bench, tmp_path / "parquet", "--output-format", "parquet") == 1
    results = json.loads((tmp_path / "parquet" / "results.json").read_text())
    assert [shard["file"] for shard in results["shards"]] == ["maps-00000.parquet"]
    shard = read_shard(tmp_path / "parquet" / "maps-00000.parquet")
    assert list(shard["index"]) == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]
    _same_as_files([shard], tmp_path / "files")


@pytest.mark.parametrize("arguments, message", [
    (["--workers", "2"], "--workers: only with --engine ray"),
    (["--engine", "ray", "--provider", "cuda"], "--provider cuda with --engine ray"),
    (["--engine", "ray", "--workers", "0"], "--workers 0: must be at least 1"),
    (["--engine", "ray", "--workers", "3"], "--workers 3: the Ray cluster has 2 CPUs"),
    (["--engine", "ray", "--gpus-per-worker", "1"], "needs 1 GPUs; the cluster has 0"),
])
def test_engine_options_are_checked_before_anything_runs(arguments, message, engine, bench, tmp_path, capsys):
    assert cli.main(["explain", str(bench / "vgg.onnx"), str(bench / "images"), "-o", str(tmp_path / "o"),
                     *arguments]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_local_engine_never_imports_ray(bench, tmp_path):
    script = ("import sys; from agf_onnx import cli; "
              f"code = cli.main(['explain', {str(bench / 'vgg.onnx')!r}, {str(bench / 'data' / 'images' / '00000.png')!r},"
              f" '-o', {str(tmp_path / 'o')!r}, '--provider', 'cpu']); "
              "assert code == 0 and 'ray' not in sys.modules, sorted(m for m in sys.modules if 'ray' in m)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:  # gone meanwhile
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_ctrl_c_stops_the_run_and_the_ray_instance_it_started(bench, tmp_path):
    pytest.importorskip("ray", reason=NO_RAY)
    command = [sys.executable, "-m", "agf_onnx", "explain", str(bench / "vgg.onnx"), str(bench / "images"),
               "-o", str(tmp_path / "out"), "--engine", "ray", "--workers", "1", "--batch-size", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(__file__)))
    ray_processes: set[int] = set()
    try:
        for line in process.stdout:
            if line.startswith("engine: ray"):  # its Ray instance is up
                break
        ray_processes = _descendants(process.pid)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 130 and "agf-onnx: interrupted" in err and "Traceback" not in err
        assert ray_processes, "the run had started a Ray instance"
        deadline = time.monotonic() + 20
        while any(map(_running, ray_processes)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in ray_processes if _running(pid)], "Ray's processes outlived the run"
        results = tmp_path / "out" / "results.json"  # absent, or saying the run did not complete
        assert not results.exists() or json.loads(results.read_text())["complete"] is False
    finally:
        for pid in [process.pid, *ray_processes]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_outcomes_are_kept_once_per_index_and_a_missing_one_is_refused(tmp_path):
    """The driver's side of fault tolerance: a rerun batch's repeated outcome is dropped, an
    image without any outcome fails the run."""
    from agf_onnx.runtime.explain import ExplainError, Explanation, ImageExplanation
    from agf_onnx.runtime.outputs import ExplainOutputs

    def outcome(index: int, value: float) -> ImageExplanation:
        explanation = Explanation(np.zeros((1, 2, 2, 3), np.uint8), np.full((1, 1, 2, 2), value, np.float32),
                                  np.array([[index]]), None, None)
        return ImageExplanation(index, f"{index}.png", explanation)

    outputs = ExplainOutputs(tmp_path, ["0.png", "1.png", "2.png"], "npz-shards")
    assert outputs.add(outcome(1, 0.5)) and outputs.add(outcome(0, 0.25))
    assert not outputs.add(outcome(1, 0.75)), "a repeated index is dropped"
    with pytest.raises(ExplainError, match="1 image\\(s\\) got no result, e.g. index 2"):
        outputs.close({}, "")
    assert outputs.add(outcome(2, 1.0))
    outputs.close({}, "")
    shard = read_shard(tmp_path / "maps-00000.npz")
    assert list(shard["index"]) == [0, 1, 2] and list(shard["heatmaps"][:, 0, 0, 0]) == [0.25, 0.5, 1.0]


def test_the_summary_does_not_depend_on_the_order_images_arrive_in():
    """Tally keys each image's scores by its index: shuffled arrival (Ray's workers finish in any
    order) gives the same bits as input order."""
    rng = np.random.default_rng(5)
    fractions = 9

    def scores(index: int) -> ImageScores:
        perturbation = {(mode, which): rng.random(fractions) < 0.5 for mode in ("negative", "positive")
                        for which in ("predicted", "target")}
        segmentation = (int(rng.integers(0, 100)), 100, float(rng.random())) if index % 3 else None
        shares = tuple(rng.random(4)) if index % 2 else ()
        return ImageScores(index, bool(index % 4), perturbation, segmentation, shares, 0.0)

    images = [scores(index) for index in range(40)]
    in_order, shuffled = Tally(), Tally()
    for image in images:
        in_order.add(image)
    for n in rng.permutation(len(images)):
        shuffled.add(images[n])
    assert summary({"m": shuffled}, 40, 1.0) == summary({"m": in_order}, 40, 1.0)
    entry = summary({"m": in_order}, 40, 1.0)["methods"]["m"]
    ap = [image.segmentation[2] for image in images if image.segmentation is not None]
    assert entry["segmentation"]["mAP"] == round(100.0 * float(np.mean(ap)), 2)
    assert entry["sensitivity"]["maps"] == 2 * sum(1 for image in images if image.shares)
