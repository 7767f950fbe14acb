"""Exact trainable-parameter integers of docs/methods.md §4 (T5-base), §3 and §9 (GPT-2 small, RoBERTa-base)."""
import pytest

import kadapt
from _models import gpt2_small_meta, roberta_base_meta, t5_base_meta

T5_BASE = 222_882_048
T5_LN = 47_616

# method -> (config, trainable, % rounded to 3 places, 8-task ratio rounded to 3 places); docs/methods.md §4.
T5_TABLE = {
    "adapter": (lambda: kadapt.AdapterConfig(), 1_855_104, 0.832, 1.065),
    "pfeiffer": (lambda: kadapt.preset("compacter_paper.pfeiffer"), 951_360, 0.427, 1.032),
    "adapterdrop": (lambda: kadapt.preset("compacter_paper.adapterdrop"), 1_101_984, 0.494, 1.038),
    "low_rank_adapter": (lambda: kadapt.LowRankAdapterConfig(), 161_664, 0.073, 1.004),
    "phm_adapter": (lambda: kadapt.PHMAdapterConfig(), 398_976, 0.179, 1.013),
    "compacter": (lambda: kadapt.CompacterConfig(), 161_728, 0.073, 1.004),
    "compacter++": (lambda: kadapt.CompacterPlusPlusConfig(), 104_704, 0.047, 1.002),
    "bitfit_compat": (lambda: kadapt.preset("compacter_paper.bitfit"), 280_932, 0.126, 1.010),
}


@pytest.fixture(scope="module")
def t5():
    model = t5_base_meta()
    assert kadapt.trainable_parameters(model) == (T5_BASE, T5_BASE)
    return model


@pytest.mark.parametrize("name", list(T5_TABLE))
def test_t5_base_table(t5, name):
    make, trainable, pct, eight_task = T5_TABLE[name]
    kadapt.patch(t5, make())
    try:
        got, total = kadapt.trainable_parameters(t5)
        assert got == trainable
        added = total - T5_BASE
        ln = T5_LN if name != "bitfit_compat" else 0
        assert added == got - ln  # everything added trains; LN weights are the only existing tensors
        assert round(100 * got / T5_BASE, 3) == pct
        assert round((8 * added + T5_BASE) / T5_BASE, 3) == eight_task
    finally:
        kadapt.unpatch(t5)
    assert kadapt.trainable_parameters(t5) == (T5_BASE, T5_BASE)


def test_t5_per_adapter_counts(t5):
    per_adapter = [(kadapt.AdapterConfig(), 37_656), (kadapt.LowRankAdapterConfig(), 2_376),
                   (kadapt.PHMAdapterConfig(), 7_320)]
    for cfg, n in per_adapter:
        kadapt.patch(t5, cfg)
        try:
            adapters = [m for name, m in t5.named_modules() if name.endswith("kadapt_adapter")]
            assert len(adapters) == 48
            assert all(sum(p.numel() for p in a.parameters()) == n for a in adapters)
        finally:
            kadapt.unpatch(t5)


def test_t5_bitfit_every_ln_bias(t5):
    kadapt.patch(t5, kadapt.BitFitConfig())
    try:
        assert kadapt.trainable_parameters(t5)[0] == 282_468
        assert round(100 * 282_468 / T5_BASE, 4) == 0.1267
    finally:
        kadapt.unpatch(t5)


def test_t5_compacter_pp_n12(t5):
    kadapt.patch(t5, kadapt.CompacterPlusPlusConfig(phm_dim=12))
    try:
        assert kadapt.trainable_parameters(t5)[0] == 24 * 2_376 + 12 ** 3 + T5_LN
        assert round(100 * kadapt.trainable_parameters(t5)[0] / T5_BASE, 4) == 0.0477
    finally:
        kadapt.unpatch(t5)


def test_compacter_rule_is_one_shared_parameter(t5):
    kadapt.patch(t5, kadapt.CompacterConfig())
    try:
        rule = t5.kadapt_phm_rule.weight
        projections = [m for m in t5.modules() if type(m).__name__ == "PHMProjection"]
        assert len(projections) == 96
        assert all(p.rule_tensor() is rule for p in projections)
        assert rule.shape == (4, 4, 4) and rule.requires_grad
    finally:
        kadapt.unpatch(t5)


def test_gpt2_small_budgets():
    model = gpt2_small_meta()
    assert kadapt.trainable_parameters(model)[1] == 124_439_808
    expected = {
        "bitfit": (kadapt.BitFitConfig(), 102_144),                                          # §3
        "pfeiffer-adapter": (kadapt.preset("kernel_adapters.nlg.pfeiffer-adapter"), 2_019_600),  # §9
        "adapter": (kadapt.AdapterConfig(), 24 * 37_656 + 38_400),                           # LNs w + b: 38,400
    }
    for name, (cfg, n) in expected.items():
        kadapt.patch(model, cfg)
        try:
            assert kadapt.trainable_parameters(model)[0] == n, name
        finally:
            kadapt.unpatch(model)


def test_gpt2_pfeiffer_adapter_preset_layout():
    model = gpt2_small_meta()
    kadapt.patch(model, kadapt.preset("kernel_adapters.nlg.pfeiffer-adapter"))
    adapters = {n: m for n, m in model.named_modules() if n.endswith("kadapt_adapter")}
    assert sorted(adapters) == [f"h.{i}.attn.c_proj.kadapt_adapter" for i in sorted(range(12), key=str)]
    a = next(iter(adapters.values()))
    assert a.bottleneck == 108 and a.act == "relu" and a.ln_pre is not None and a.ln_post is None
    assert [sum(p.numel() for p in part.parameters()) for part in (a.ln_pre, a.down, a.up)] == [1_536, 83_052, 83_712]


def test_roberta_base_budgets():
    model = roberta_base_meta()
    assert kadapt.trainable_parameters(model)[1] == 124_645_632
    for cfg, n in ((kadapt.BitFitConfig(), 102_144), (kadapt.AdapterConfig(), 24 * 37_656 + 38_400)):
        kadapt.patch(model, cfg)
        try:
            assert kadapt.trainable_parameters(model)[0] == n
        finally:
            kadapt.unpatch(model)
