"""Memory bounded by design (issue 25): model files read and written without a second copy of the
weights, and runs sized to ``--max-memory`` from each model's measured cost per image.

The sizing logic is checked with scripted costs (exact numbers) and with small real models
(orderings and generous bounds only: resident memory on a shared machine is not exact)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import agf_onnx
from agf_onnx import modelfile
from agf_onnx.cli import main
from agf_onnx.compiler import passes
from agf_onnx.compiler.modifiers import Modifiers
from agf_onnx.runtime import budget
from agf_onnx.runtime.budget import BudgetError, RunCost, parse_memory
from agf_onnx.runtime.explain import Explainer

from . import models
from .runtime import run
from .test_bad_inputs import small_classifier

MIB = 2**20


# -- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("8G", 8 * 2**30), ("8GiB", 8 * 2**30), ("2.5GB", 2_500_000_000),
                                            ("512M", 512 * MIB), ("512mb", 512_000_000), ("4096", 4096),
                                            (" 1 k ", 1024)])
def test_sizes_parse_in_binary_and_decimal_units(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "G", "8X", "-1G", "0", "1e9"])
def test_a_bad_size_is_refused_naming_it(text):
    with pytest.raises(BudgetError, match="--max-memory"):
        parse_memory(text)


# -- the cost model -----------------------------------------------------------------------------

def scripted(monkeypatch, resident: int, peaks: list[int]) -> list[int]:
    """``budget.measure`` sees ``resident`` before the runs and ``peaks`` during them; returns the
    batch sizes it ran."""
    ran: list[int] = []
    monkeypatch.setattr(budget, "resident_memory", lambda: resident)
    script = iter(peaks)
    monkeypatch.setattr(budget, "peak_during", lambda call: (call(), next(script))[1])
    return ran


def test_the_cost_is_the_line_through_the_runs_of_one_and_two_images(monkeypatch):
    ran = scripted(monkeypatch, 1000 * MIB, [1000 * MIB + 130 * MIB, 1000 * MIB + 230 * MIB])
    cost = budget.measure(ran.append, budget=10 * 2**30)
    assert ran == [1, 2]
    assert cost == RunCost(1000 * MIB, 30 * MIB, 100 * MIB)
    # (budget − resident) / MARGIN − fixed, in whole images of 100 MiB
    assert cost.images_within(1000 * MIB + int(budget.MARGIN * 530 * MIB), 50) == 5
    assert cost.images_within(1000 * MIB + int(budget.MARGIN * 529 * MIB), 50) == 4
    assert cost.images_within(10 * 2**30, 8) == 8  # the asked batch binds
    assert cost.peak(5) == 1000 * MIB + int(budget.MARGIN * 530 * MIB)


def test_no_second_run_where_two_images_would_not_fit(monkeypatch):
    ran = scripted(monkeypatch, 1000 * MIB, [1000 * MIB + 900 * MIB])
    cost = budget.measure(ran.append, budget=2000 * MIB)
    assert ran == [1] and cost == RunCost(1000 * MIB, 0, 900 * MIB)  # all of it counted per image
    assert cost.images_within(2000 * MIB, 50) == 0
    with pytest.raises(BudgetError, match=r"one image needs 1\.\d\d GiB .*raise --max-memory to at least"):
        budget.check_fits(cost, 2000 * MIB)


def test_a_budget_below_what_the_loaded_model_holds_is_refused_before_any_run(monkeypatch):
    ran = scripted(monkeypatch, 1000 * MIB, [])
    with pytest.raises(BudgetError, match="the loaded model alone holds 1000 MiB"):
        budget.measure(ran.append, budget=900 * MIB)
    assert ran == []


def test_the_default_budget_is_half_the_available_memory_above_what_the_process_holds(monkeypatch):
    monkeypatch.setattr(budget, "available_memory", lambda: 8 * 2**30)
    monkeypatch.setattr(budget, "resident_memory", lambda: 300 * MIB)
    assert budget.default_budget() == 4 * 2**30 + 300 * MIB
    assert budget.default_budget(share=1 / 4) == 2**30 + 300 * MIB  # a Ray worker's share


def test_available_memory_is_read_from_the_system():
    total = budget.os.sysconf("SC_PAGE_SIZE") * budget.os.sysconf("SC_PHYS_PAGES")
    assert 0 < budget.available_memory() <= total


# -- runs split to fit --------------------------------------------------------------------------

def counted(explainer: Explainer) -> list[int]:
    sizes: list[int] = []
    session_run = explainer.session.run

    def recording(outputs, feeds):
        sizes.append(len(feeds[explainer.image_input]))
        return session_run(outputs, feeds)

    explainer.session.run = recording
    return sizes


@pytest.mark.parametrize("method, options", [("integrated-gradients", {"steps": 6}), ("smoothgrad", {"samples": 5})])
def test_a_batch_over_the_budget_runs_in_parts_with_the_maps_of_one_run(method, options):
    compiled = agf_onnx.compile(small_classifier(), method=method, options=options)
    photos = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    targets = np.array([0, 3, 1, 4, 2, 0, 1])
    whole = Explainer(compiled, "cpu", preset="unit", max_memory="64G")
    whole.run_cost = RunCost(0, 0, 1)
    sizes = counted(whole)
    expected = whole.run(whole.to_tensor(photos), targets)
    assert sizes == [7]
    parts = Explainer(compiled, "cpu", preset="unit", max_memory=int(budget.MARGIN * 3 * MIB) + 1)
    parts.run_cost = RunCost(0, 0, MIB)  # scripted: three images fit
    sizes = counted(parts)
    split = parts.run(parts.to_tensor(photos), targets)
    assert sizes == [3, 3, 1]
    for name, value in expected.items():
        np.testing.assert_allclose(split[name], value, rtol=1e-6, atol=1e-7)


def test_one_target_for_all_is_kept_for_every_part():
    compiled = agf_onnx.compile(small_classifier())
    explainer = Explainer(compiled, "cpu", preset="unit", max_memory=int(budget.MARGIN * 2 * MIB) + 1)
    explainer.run_cost = RunCost(0, 0, MIB)
    photos = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    split = explainer.run(explainer.to_tensor(photos), np.array([2]))
    direct = run(compiled, {"x": explainer.to_tensor(photos), "target": np.array([2], np.int64)})
    np.testing.assert_allclose(split["heatmap"], direct["heatmap"], rtol=1e-6, atol=1e-7)


def vgg(image: int = 64) -> onnx.ModelProto:
    net = models.seeded(models.VGGish(widths=(32, "M", 64, "M", 128, "M"), image=image, classes=10, hidden=64),
                        image=image)
    return models.export(net, image)


def measured(compiled: onnx.ModelProto, photos: np.ndarray) -> tuple[Explainer, np.ndarray]:
    explainer = Explainer(compiled, "cpu", preset="unit", max_memory="64G")
    batch = explainer.to_tensor(photos)
    explainer.images_per_run(batch, np.array([-1]))
    return explainer, batch


def test_the_measured_cost_per_image_grows_with_the_copies_a_method_makes():
    """The cost is measured, not a constant: AGF --smooth 8 runs 9 copies of every activation per
    image, and costs several times AGF's per image; the line through the runs of 1 and 2 images
    bounds the peak of a run of 8 (generously: resident memory is not exact)."""
    source = vgg()
    photos = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    plain, _ = measured(agf_onnx.compile(source), photos)
    smooth, batch = measured(agf_onnx.compile(source, modifiers=Modifiers(smooth=8)), photos)
    assert smooth.run_cost.per_image > 3 * plain.run_cost.per_image > 0
    peak = budget.peak_during(lambda: smooth._run_once(batch, np.array([-1])))
    assert peak <= smooth.run_cost.peak(8) + 64 * MIB


def test_a_budget_too_small_for_one_image_is_one_line_and_no_output(tmp_path, capsys, monkeypatch):
    from PIL import Image

    model = tmp_path / "vgg.onnx"
    onnx.save(agf_onnx.compile(vgg(32), method="integrated-gradients", options={"steps": 8}), model)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    # the loaded model alone passes the budget
    assert main(["explain", str(model), str(image), "-o", str(out), "--max-memory", "10M", "--provider", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("agf-onnx: error: --max-memory 10 MiB is too small") and "\n" not in err
    assert not out.exists()
    # one image does not fit beside it: measured (a run scripted to cost 1 GiB), then refused
    monkeypatch.setattr(budget, "peak_during", lambda call: (call(), budget.resident_memory() + 2**30)[1])
    tight = f"{(budget.resident_memory() + 300 * MIB) // MIB}M"
    code = main(["explain", str(model), str(image), "-o", str(out), "--max-memory", tight, "--provider", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err, err
    assert "too small for the model: one image needs" in err and "raise --max-memory to at least" in err
    assert not out.exists()


def test_explain_within_a_budget_that_fits_writes_its_maps(tmp_path):
    from PIL import Image

    model = tmp_path / "small.onnx"
    onnx.save(agf_onnx.compile(small_classifier(), method="smoothgrad", options={"samples": 4}), model)
    for index in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * index, np.uint8)).save(tmp_path / f"{index}.png")
    out = tmp_path / "out"
    assert main(["explain", str(model), *(str(tmp_path / f"{i}.png") for i in range(3)), "-o", str(out),
                 "--max-memory", "16G", "--batch-size", "50", "--provider", "cpu", "--preset", "unit"]) == 0
    assert len(json.loads((out / "results.json").read_text())["images"]) == 3


def test_bad_max_memory_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "m.onnx", "a.png", "-o", str(tmp_path), "--max-memory", "lots"])
    assert exit_info.value.code == 2 and "--max-memory" in capsys.readouterr().err


# -- model files ----------------------------------------------------------------------------------

def test_a_model_written_piece_by_piece_reads_back_the_same(tmp_path):
    model = agf_onnx.compile(vgg(32), top_k=2)
    for external in (False, True):
        path = tmp_path / f"m{int(external)}.onnx"
        before = model.SerializeToString()
        modelfile.save(model, path, external_data=external)
        assert model.SerializeToString() == before, "the model in memory is left as it was"
        assert (tmp_path / f"m{int(external)}.onnx.data").exists() == external
        again = onnx.load(path)
        for tensor in again.graph.initializer:  # onnx.load marks what it read back from the data file
            tensor.ClearField("data_location")
        assert again == model
        assert modelfile.load(path) == onnx.load(path)
        onnx.checker.check_model(str(path), full_check=True)
        x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
        feeds = {"x": x, "target": np.array([-1], np.int64)}
        for name, value in run(model, feeds).items():
            np.testing.assert_array_equal(run(onnx.load(path), feeds)[name], value)


def test_reading_without_weights_keeps_the_graph_and_the_external_entries(tmp_path):
    model = agf_onnx.compile(vgg(32))
    path = tmp_path / "m.onnx"
    modelfile.save(model, path, external_data=True)
    light = modelfile.read(path, weights=False)
    assert [n.name for n in light.graph.node] == [n.name for n in model.graph.node]
    assert light.metadata_props == model.metadata_props
    assert modelfile.uses_external_data(path) and modelfile.external_files(path) == [str(tmp_path / "m.onnx.data")]
    plain = tmp_path / "plain.onnx"
    modelfile.save(model, plain)
    assert not modelfile.uses_external_data(plain) and modelfile.size_on_disk(plain) == plain.stat().st_size


def test_fold_constants_keeps_the_initializers_it_does_not_drop_in_place():
    """Rebuilding ``graph.initializer`` copies every tensor into the model's arena for good (upb):
    a kept initializer must stay the same message."""
    model = small_classifier()
    graph = model.graph
    kept = {t.name for t in graph.initializer}
    first = graph.initializer[0]
    passes.keep_initializers(graph, kept - {graph.initializer[-1].name},
                             [onnx.numpy_helper.from_array(np.zeros(2, np.float32), "added")])
    assert graph.initializer[0] is first or graph.initializer[0] == first
    assert [t.name for t in graph.initializer][-1] == "added" and len(graph.initializer) == len(kept)
