"""mergekit 0.1.5's methods in wb (`MERGEKIT_METHODS`), against mergekit's own implementation run
in-process on the same float32 tensors (`mergekit.merge_methods.merge_tensors`): the deterministic
methods within 2e-5, the random ones (DARE, DELLA) by their statistics; exact-k trimming on inputs
full of ties; the declarations (names, defaults, scopes, base use) against mergekit's specs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mergekit.merge_methods import get as mergekit_method
from mergekit.merge_methods import merge_tensors

from workbench.errors import WorkbenchError
from workbench.weights.methods import streaming, trim
from workbench.weights.methods.base import MergeMethod, TensorInputs
from workbench.weights.methods.mergekit_methods import MERGEKIT_METHODS
from workbench.weights.recipe import validate

METHODS = {method.name: method for method in MERGEKIT_METHODS}
ISSUE_ORDER = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear", "sce", "model_stock", "slerp", "nuslerp", "multislerp", "karcher", "nearswap",
               "passthrough", "arcee_fusion")
RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")
SHAPE = (64, 48)


def tensors(count: int, seed: int = 0, shape: tuple[int, ...] = SHAPE, spread: float = 0.1) -> list[torch.Tensor]:
    """A base and `count` fine-tunes of it (base + spread·(a shared direction + noise), so their task
    vectors are correlated as real fine-tunes' are): fp32, no two entries equal."""
    generator = torch.Generator().manual_seed(seed)
    base, shared = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    return [base] + [base + spread * (0.5 * shared + torch.randn(shape, generator=generator)) for _ in range(count)]


def with_weights(name: str, per_model: dict[str, list] | None, count: int) -> dict[str, list]:
    """`per_model` with weight 1.0 for each model where the method takes a (required) weight and
    none is given, as the command line's `--weights` defaults."""
    per_model = dict(per_model or {})
    if METHODS[name].param("weight") is not None:
        per_model.setdefault("weight", [1.0] * count)
    return per_model


def run_wb(name: str, base: torch.Tensor | None, models: list[torch.Tensor], shared: dict[str, Any] | None = None,
           per_model: dict[str, list] | None = None, seed: int = 1) -> torch.Tensor:
    """wb's method on copies of the inputs, parameters resolved as the engine does (defaults filled)."""
    method, shared, per_model = METHODS[name], shared or {}, with_weights(name, per_model, len(models))
    params = {p.name: shared.get(p.name, p.default) for p in method.params if not p.per_model}
    model_params = [{p.name: per_model[p.name][i] if p.name in per_model else p.default
                     for p in method.params if p.per_model} for i in range(len(models))]
    inputs = TensorInputs(name, None if base is None else base.clone(), [m.clone() for m in models],
                          model_params, params, torch.Generator().manual_seed(seed))
    return method.merge_tensor(inputs)


def run_mergekit(name: str, base: torch.Tensor | None, models: list[torch.Tensor],
                 shared: dict[str, Any] | None = None, per_model: dict[str, list] | None = None) -> torch.Tensor:
    """mergekit's own method on the same tensors (base first when there is one)."""
    inputs = ([] if base is None else [base]) + models
    per_model = with_weights(name, per_model, len(models))
    return merge_tensors(inputs, name, parameters={**(shared or {}), **per_model},
                         base_index=None if base is None else 0)


def test_the_methods_are_the_issues_in_its_order():
    assert tuple(METHODS) == ISSUE_ORDER
    assert all(isinstance(method, MergeMethod) for method in MERGEKIT_METHODS)


POLICY = {"required": "required", "optional": "optional", "ignored": "unused"}


@pytest.mark.parametrize("name", ISSUE_ORDER)
def test_declarations_are_mergekits(name):
    ours, theirs = METHODS[name], mergekit_method(name).spec
    assert {p.name for p in ours.params} == {p.name for p in theirs.parameters}
    for spec in theirs.parameters:
        param = ours.param(spec.name)
        assert param.per_model == (spec.scope.value != "shared"), spec.name
        assert param.required == spec.required, spec.name
        if not spec.required:
            assert param.default == spec.default and type(param.default) is type(spec.default), spec.name
            assert param.default is None or param.allows(param.default)
    assert ours.base_model == POLICY[theirs.contract.base.value]
    assert ours.reference.startswith("mergekit 0.1.5 merge_methods/")


@pytest.mark.parametrize(("name", "param", "bad"), [
    ("ties", "density", 1.5), ("dare_ties", "density", -0.1), ("breadcrumbs", "gamma", 2.0),
    ("della", "epsilon", 0.5), ("sce", "select_topk", 1.01), ("karcher", "max_iter", -1), ("karcher", "max_iter", 2.5),
    ("nearswap", "t", -0.1), ("multislerp", "eps", -1e-9), ("ties", "normalize", 1), ("ties", "lambda", float("nan")),
    ("linear", "weight", float("inf")),
])
def test_out_of_range_values_are_one_error_line(name, param, bad):
    declared = METHODS[name].param(param)
    assert not declared.allows(bad) and declared.allows(declared.default if not declared.required else 0.5)
    with pytest.raises(WorkbenchError) as error:
        validate(bad, declared, "recipe.yml")
    assert param in str(error.value) and "\n" not in str(error.value)


def case(name, count, shared=None, per_model=None, with_base=True, shape=SHAPE, seed=0, id=None):
    return pytest.param(name, count, shared or {}, per_model or {}, with_base, shape, seed, id=id)


DETERMINISTIC = [
    case("linear", 3, per_model={"weight": [1.0, 2.0, 3.0]}, with_base=False, id="linear"),
    case("linear", 3, {"normalize": False}, {"weight": [1.0, -2.0, 0.5]}, with_base=False, id="linear-sum"),
    case("task_arithmetic", 3, per_model={"weight": [0.5, 0.3, 0.2]}, id="task_arithmetic"),
    case("task_arithmetic", 2, {"normalize": True, "lambda": 0.7}, {"weight": [0.6, 0.4]}, id="task_arithmetic-norm"),
    case("ties", 2, per_model={"weight": [0.6, 0.4], "density": [0.5, 0.3]}, id="ties"),
    case("ties", 3, {"normalize": False, "lambda": 1.3, "rescale": True, "int8_mask": True},
         {"weight": [0.6, -0.4, 1.0], "density": [0.5, 0.2, 0.9]}, id="ties-rescale"),
    case("ties", 2, per_model={"weight": [1.0, 1.0], "density": [0.001, 0.3]}, shape=(48,), id="ties-1d"),
    case("dare_ties", 2, per_model={"weight": [0.7, 0.3], "density": [1.0, 1.0]}, id="dare_ties-dense"),
    case("della", 2, per_model={"weight": [0.7, 0.3], "density": [1.0, 1.0]}, id="della-dense"),
    case("breadcrumbs", 3, per_model={"weight": [0.6, 0.4, 0.3], "density": [0.5, 0.3, 0.9],
                                      "gamma": [0.01, 0.1, 0.05]}, id="breadcrumbs"),
    case("breadcrumbs", 2, per_model={"weight": [1.0, 1.0], "density": [0.95, 0.8], "gamma": [0.1, 0.3]},
         id="breadcrumbs-gamma-cut"),
    case("breadcrumbs_ties", 3, {"normalize": True, "rescale": True},
         {"weight": [0.6, 0.4, 0.3], "density": [0.5, 0.3, 0.9], "gamma": [0.01, 0.1, 0.1]}, id="breadcrumbs_ties"),
    case("sce", 3, id="sce"),
    case("sce", 3, {"select_topk": 0.3}, id="sce-topk"),
    case("model_stock", 3, id="model_stock"),
    case("model_stock", 2, {"filter_wise": True}, id="model_stock-filter"),
    case("model_stock", 2, {"filter_wise": True}, shape=(48,), id="model_stock-filter-1d"),
    *(case("slerp", 1, {"t": t}, id=f"slerp-{t}") for t in (0.0, 0.3, 1.0)),
    case("slerp", 1, {"t": 0.3}, shape=(48,), id="slerp-1d"),
    case("nuslerp", 2, per_model={"weight": [0.3, 0.7]}, id="nuslerp"),
    case("nuslerp", 2, {"nuslerp_flatten": False}, {"weight": [0.3, 0.7]}, with_base=False, id="nuslerp-rows"),
    case("nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, {"weight": [1.0, 2.0]},
         id="nuslerp-columns"),
    case("nuslerp", 2, {"nuslerp_flatten": False}, {"weight": [0.0, 0.0]}, shape=(48,), id="nuslerp-1d-zero-weights"),
    case("multislerp", 3, per_model={"weight": [1.0, 2.0, 3.0]}, id="multislerp"),
    case("multislerp", 3, {"normalize_weights": False}, {"weight": [0.2, 0.3, 0.5]}, with_base=False,
         id="multislerp-nobase"),
    case("karcher", 3, with_base=False, id="karcher"),
    case("karcher", 4, {"max_iter": 3, "tol": 1e-6}, with_base=False, id="karcher-iter"),
    case("nearswap", 1, {"t": 0.05}, id="nearswap"),
    case("passthrough", 1, per_model={"scale": [0.5]}, with_base=False, id="passthrough"),
    case("passthrough", 1, with_base=False, id="passthrough-unscaled"),
    case("arcee_fusion", 1, id="arcee_fusion"),
    case("arcee_fusion", 1, shape=(48,), id="arcee_fusion-1d"),
]


@pytest.mark.parametrize(("name", "count", "shared", "per_model", "with_base", "shape", "seed"), DETERMINISTIC)
def test_deterministic_methods_equal_mergekit(name, count, shared, per_model, with_base, shape, seed):
    base, *models = tensors(count, seed, shape)
    if not with_base:
        base = None
    ours = run_wb(name, base, models, shared, per_model)
    theirs = run_mergekit(name, base, models, shared, per_model)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    if base is not None and shared.get("t") != 0.0:
        assert (ours - base).abs().max() > 1e-3  # the comparison is not vacuous: the merge moved the base


def test_degenerate_branches_equal_mergekit():
    """The linear fallbacks of the spherical methods and arcee_fusion's threshold keeping part."""
    base, model = tensors(1)
    collinear = 2.0 * base
    for name, shared, inputs in [("slerp", {"t": 0.4}, (base, [collinear])),
                                 ("nuslerp", {}, (None, [base, collinear])),
                                 ("multislerp", {}, (None, [base, -base]))]:
        ours = run_wb(name, inputs[0], inputs[1], shared)
        torch.testing.assert_close(ours, run_mergekit(name, inputs[0], inputs[1], shared,
                                                      {} if name == "slerp" else {"weight": [1.0, 1.0]}),
                                   rtol=0, atol=2e-5)
    fused = run_wb("arcee_fusion", base, [model])
    changed = (fused != base).float().mean().item()
    assert 0 < changed < 0.5  # the threshold keeps some of the model's changes, not all


def weights_and_density(count: int) -> dict[str, list]:
    return {"weight": [0.6, 0.4][:count], "density": [0.3, 0.7][:count], "epsilon": [0.1, 0.2][:count]}


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_have_mergekits_statistics(name):
    """Over 40 seeds the mean of every entry, and the spread, agree with 40 mergekit runs."""
    base, *models = tensors(2)
    per_model = {k: v for k, v in weights_and_density(2).items() if METHODS[name].param(k)}
    runs = 40
    ours = torch.stack([run_wb(name, base, models, per_model=per_model, seed=s) for s in range(runs)])
    torch.manual_seed(0)
    theirs = torch.stack([run_mergekit(name, base, models, per_model=per_model) for _ in range(runs)])
    noise = ((ours.var(0) + theirs.var(0)) / runs).sum()
    assert ((ours.mean(0) - theirs.mean(0)) ** 2).sum() < 1.3 * noise  # same expectation (ratio ≈ 1 ± 0.05)
    assert ours.var(0).sum() / theirs.var(0).sum() == pytest.approx(1.0, abs=0.07)  # same spread


@pytest.mark.parametrize("name", RANDOM)
def test_random_sparsification_keeps_density_and_rescales_l1(name):
    base, model = tensors(1)
    tau = model - base
    per_model = {"weight": [1.0], "density": [0.3], "epsilon": [0.1]}
    kept = run_wb(name, base, [model], per_model=per_model) - base
    mask = kept != 0
    numel = tau.numel()
    assert abs(mask.sum().item() - 0.3 * numel) < 4 * (0.3 * 0.7 * numel) ** 0.5
    assert kept.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)  # mergekit's L1 rescale
    factor = kept[mask] / tau[mask]
    torch.testing.assert_close(factor, factor.mean().expand_as(factor), rtol=1e-4, atol=0)
    plain = run_wb(name, base, [model], {"rescale": False}, per_model) - base
    torch.testing.assert_close(plain[mask], tau[mask], rtol=0, atol=1e-6)  # same mask, no rescale


def test_della_keep_probability_follows_the_magnitude_rank():
    """Per row, the smallest |τ| is kept with probability density − ε, the largest with density + ε."""
    base, model = tensors(1)
    order = (model - base).abs().argsort(dim=1)
    smallest, largest = order[:, :1], order[:, -1:]
    kept_small = kept_large = 0.0
    for seed in range(40):
        kept = run_wb("della_linear", base, [model], {"rescale": False},
                      {"weight": [1.0], "density": [0.5], "epsilon": [0.3]}, seed=seed) != base
        kept_small += kept.gather(1, smallest).float().mean().item() / 40
        kept_large += kept.gather(1, largest).float().mean().item() / 40
    assert kept_small == pytest.approx(0.2, abs=0.06) and kept_large == pytest.approx(0.8, abs=0.06)


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_are_determined_by_their_generator(name):
    base, *models = tensors(2)
    per_model = {k: v for k, v in weights_and_density(2).items() if METHODS[name].param(k)}
    first = run_wb(name, base, models, per_model=per_model, seed=7)
    assert torch.equal(first, run_wb(name, base, models, per_model=per_model, seed=7))
    assert not torch.equal(first, run_wb(name, base, models, per_model=per_model, seed=8))
    if torch.cuda.is_available():  # the draws come from the generator, whatever the merge device
        on_gpu = run_wb(name, base.cuda(), [m.cuda() for m in models], per_model=per_model, seed=7)
        torch.testing.assert_close(on_gpu.cpu(), first, rtol=0, atol=1e-6)


def tied_delta(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """A τ like a bf16 fine-tune's: few distinct magnitudes, so a trim threshold has many ties."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=generator).float() * 2.0 ** -8


def reference_window(scores: torch.Tensor, skip: int, keep: int) -> torch.Tensor:
    """The entries at descending positions [skip, skip + keep) of (score descending, index
    ascending), by Python's sort: the stable tie-break wb documents."""
    flat = scores.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order[skip:skip + keep]] = True
    return mask.reshape(scores.shape)


@pytest.mark.parametrize("chunk", [trim.CHUNK, 500])
def test_trims_keep_exactly_k_on_ties(monkeypatch, chunk):
    monkeypatch.setattr(trim, "CHUNK", chunk)  # 500: tie ordinals and histograms across chunk boundaries
    base = torch.zeros(SHAPE)
    tau = tied_delta()
    numel = tau.numel()
    for density in (0.2, 0.5):
        k = int(density * numel)
        ties = run_wb("ties", base, [base + tau], per_model={"density": [density]})
        assert torch.equal(ties != 0, reference_window(tau.abs(), 0, k))
        theirs = run_mergekit("ties", base, [base + tau], per_model={"weight": [1.0], "density": [density]})
        assert (theirs != 0).sum().item() == k  # mergekit keeps k too, picking among the ties its own way
        crumbs = run_wb("breadcrumbs", base, [base + tau], per_model={"density": [density], "gamma": [0.1]})
        skip = numel - max(0, numel - k - int(0.1 * numel)) - k
        assert torch.equal(crumbs != 0, reference_window(tau.abs(), skip, k))
    others = [base + tied_delta(seed) for seed in (1, 2)]
    sce = run_wb("sce", base, others, {"select_topk": 0.25})
    variance = torch.var(torch.stack([m - base for m in others]), dim=0, unbiased=False)
    selected = reference_window(variance, 0, int(torch.count_nonzero(variance) * 0.25))
    assert not sce[~selected].any() and (sce[selected] != 0).float().mean() > 0.5


@pytest.mark.parametrize("chunk", [trim.CHUNK, 16])
def test_kth_largest_is_exact(monkeypatch, chunk):
    monkeypatch.setattr(trim, "CHUNK", chunk)
    generator = torch.Generator().manual_seed(3)
    for values in (torch.randn(301, generator=generator), tied_delta(1, (17, 9)).reshape(-1),
                   torch.tensor([0.0, -0.0, -1.5, 2.0, float("inf"), -float("inf"), 1e-40, -1e-40])):
        ordered = sorted(values.tolist(), reverse=True)
        for k in sorted({1, 2, values.numel() // 3, values.numel() // 2, values.numel() - 1, values.numel()}):
            assert trim.kth_largest(values, k) == ordered[k - 1]
    assert torch.equal(trim.window_mask(values, 2, 3), reference_window(values, 2, 3))


@pytest.mark.parametrize("name", [m.name for m in MERGEKIT_METHODS if m.row_blocks])
def test_row_block_methods_are_row_local(name):
    method = METHODS[name]
    count = 1 if name in ("nearswap", "passthrough") else 3
    base, *models = tensors(count)
    if method.base_model == "unused":
        base = None
    shared = {"t": 0.05} if name == "nearswap" else {}
    whole = run_wb(name, base, models, shared)
    rows = slice(10, 27)
    block = run_wb(name, None if base is None else base[rows], [m[rows] for m in models], shared)
    torch.testing.assert_close(block, whole[rows], rtol=0, atol=0)


@pytest.mark.parametrize(("name", "shared"), [("slerp", {"t": 0.3}), ("nuslerp", {}), ("ties", {}),
                                              ("model_stock", {}), ("arcee_fusion", {})])
def test_whole_tensor_methods_are_not_row_local(name, shared):
    """Why these take whole tensors: merged rows depend on the other rows (norms, angles, thresholds)."""
    assert not METHODS[name].row_blocks
    count = {"slerp": 1, "arcee_fusion": 1, "nuslerp": 2}.get(name, 3)
    base, *models = tensors(count)
    per_model = {"density": [0.3] * count} if name == "ties" else {}
    whole = run_wb(name, base, models, shared, per_model)
    rows = slice(0, 16)
    block = run_wb(name, base[rows], [m[rows] for m in models], shared, per_model)
    assert (block - whole[rows]).abs().max() > 1e-4


@pytest.mark.parametrize(("name", "count", "shared", "per_model", "message"), [
    ("slerp", 2, {"t": 0.5}, {}, "slerp takes exactly 1 model(s) besides the base, got 2 on w"),
    ("nuslerp", 3, {}, {}, "nuslerp takes exactly 2 model(s) besides the base, got 3 on w"),
    ("model_stock", 1, {}, {}, "model_stock takes at least 2 model(s) besides the base, got 1 on w"),
    ("passthrough", 2, {}, {}, "passthrough takes exactly one model per tensor, got 2 on w"),
    ("della", 1, {}, {"density": [0.1], "epsilon": [0.15]}, "della: density ± epsilon must lie in (0, 1)"),
    ("linear", 2, {}, {"weight": [1.0, -1.0]}, "linear: the weights sum to 0 on w"),
])
def test_impossible_inputs_are_one_error_line(name, count, shared, per_model, message):
    base, *models = tensors(count)
    method, per_model = METHODS[name], with_weights(name, per_model, count)
    params = {p.name: shared.get(p.name, p.default) for p in method.params if not p.per_model}
    model_params = [{p.name: per_model[p.name][i] if p.name in per_model else p.default
                     for p in method.params if p.per_model} for i in range(count)]
    inputs = TensorInputs("w", None if method.base_model == "unused" else base, models, model_params, params,
                          torch.Generator().manual_seed(0))
    with pytest.raises(WorkbenchError) as error:
        method.merge_tensor(inputs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


STREAMED = [
    case("ties", 2, {"rescale": True}, {"weight": [0.6, 0.4], "density": [0.3, 0.5]}, id="ties"),
    case("breadcrumbs_ties", 2, {}, {"weight": [0.6, 0.4], "density": [0.3, 0.8], "gamma": [0.05, 0.1]},
         id="breadcrumbs_ties"),
    case("dare_ties", 2, {}, {"weight": [0.6, 0.4], "density": [0.3, 0.5]}, id="dare_ties"),
    case("dare_linear", 2, {"rescale": False}, {"weight": [0.6, 0.4], "density": [0.3, 0.5]}, id="dare_linear"),
    case("della", 2, {}, {"weight": [0.6, 0.4], "density": [0.3, 0.5], "epsilon": [0.1, 0.2]}, id="della"),
    case("della", 2, {}, {"density": [0.3, 0.5]}, shape=(48,), id="della-1d"),
    case("task_arithmetic", 2, {"lambda": 0.5}, {"weight": [0.6, 0.4]}, id="task_arithmetic"),
    case("slerp", 1, {"t": 0.3}, id="slerp"),
    case("nuslerp", 2, {}, {"weight": [0.3, 0.7]}, id="nuslerp"),
    case("nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, {"weight": [0.3, 0.7]},
         with_base=False, id="nuslerp-columns"),
    case("nuslerp", 2, {"nuslerp_flatten": False}, {"weight": [0.3, 0.7]}, id="nuslerp-rows"),
    case("model_stock", 3, id="model_stock"),
    case("model_stock", 2, {"filter_wise": True}, id="model_stock-filter"),
    case("multislerp", 3, {}, {"weight": [1.0, 2.0, 3.0]}, id="multislerp"),
    case("arcee_fusion", 1, id="arcee_fusion"),
    case("karcher", 3, with_base=False, id="karcher"),
]


@pytest.mark.parametrize(("name", "count", "shared", "per_model", "with_base", "shape", "seed"), STREAMED)
def test_streamed_blocks_equal_the_whole_tensor(monkeypatch, name, count, shared, per_model, with_base, shape, seed):
    """`merge_blocks` (passes over row blocks, what bounds memory on a large tensor) gives the whole
    tensor's merge, ties and random draws included; tie ordinals cross block boundaries."""
    monkeypatch.setattr(trim, "CHUNK", 512)
    monkeypatch.setattr(streaming, "PIECE", 480)  # pieces of 10 rows inside each block
    base, *models = tensors(count, seed, shape)
    models[0] = models[0] + tied_delta(5, shape)  # ties in |τ| across blocks
    if not with_base:
        base = None
    method = METHODS[name]
    whole = run_wb(name, base, models, shared, per_model, seed=3)
    per_model = with_weights(name, per_model, count)
    params = {p.name: shared.get(p.name, p.default) for p in method.params if not p.per_model}
    model_params = [{p.name: per_model[p.name][i] if p.name in per_model else p.default
                     for p in method.params if p.per_model} for i in range(count)]
    generator = torch.Generator().manual_seed(3)
    reads = []

    def read(start: int, stop: int) -> TensorInputs:
        reads.append((start, stop))
        return TensorInputs(name, None if base is None else base[start:stop].clone(),
                            [m[start:stop].clone() for m in models], model_params, params, generator, start, stop)

    blocks = [(0, 5), (5, 17), (17, 40), (40, shape[0])]
    merged = torch.cat(list(method.merge_blocks(read, blocks)))
    torch.testing.assert_close(merged, whole, rtol=0, atol=1e-6)
    if len(shape) > 1:
        assert max(stop - start for start, stop in reads) < shape[0]  # never the whole tensor at once
