"""Exact docs/methods.md §11 and §9 parameter budgets of the attention-side methods (prefix, inducer, MAM),
asserted as integers on GPT-2 small and RoBERTa-base built on the meta device (nothing downloaded)."""
import pytest

import kadapt
from _models import gpt2_small_meta, roberta_base_meta, t5_base_meta


def _count(model, config) -> int:
    kadapt.patch(model, config)
    try:
        return kadapt.trainable_parameters(model)[0]
    finally:
        kadapt.unpatch(model)


def _per_module(model, config, suffix: str) -> dict[str, int]:
    kadapt.patch(model, config)
    try:
        return {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_modules() if n.endswith(suffix)}
    finally:
        kadapt.unpatch(model)


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_small_meta()


@pytest.fixture(scope="module")
def roberta():
    return roberta_base_meta()


@pytest.mark.parametrize("preset,per_layer,total", [
    ("kernel_adapters.nlg.inducer-no-lora", 16_248 + 150_708, 2_003_472),
    ("kernel_adapters.nlg.inducer-lora", 8_508 + 120_720 + 37_632, 2_002_320),
    ("kernel_adapters.nlg.inducer-mam", 5_412 + 70_740 + 25_344 + 66_858, 2_020_248),
])
def test_gpt2_inducer_presets(gpt2, preset, per_layer, total):
    assert 12 * per_layer == total
    assert _count(gpt2, kadapt.preset(preset)) == total


@pytest.mark.parametrize("preset,per_layer,total", [
    ("kernel_adapters.nlu.inducer-lora", 3_864 + 40_752 + 6_144, 609_120),
    ("kernel_adapters.nlu.inducer-no-lora", 10_056 + 40_752, 609_696),
    ("kernel_adapters.nlu.inducer-para-ffn", 3_864 + 20_760 + 6_144 + 19_212, 599_760),
])
def test_roberta_inducer_presets(roberta, preset, per_layer, total):
    assert 12 * per_layer == total
    assert _count(roberta, kadapt.preset(preset)) == total


def test_inducer_part_formulas(gpt2):
    """§8 item 10 per layer: key MLP H(2d m_k + m_k + d); value MLP with extension H(d m_v + m_v) + H m_v D + D;
    with head share H(d m_v + m_v) + m_v D + D; without extension H(2d m_v + m_v + d)."""
    H, d, D = 12, 64, 768
    for mk, mv, ext, share in ((10, 15, True, False), (0, 15, True, False), (3, 7, True, True), (5, 4, False, False)):
        cfg = kadapt.InducerTuningConfig(key_width=mk, value_width=mv, value_extension=ext, head_share=share)
        key = H * (2 * d * mk + mk + d) if mk else 0
        if not ext:
            value = H * (2 * d * mv + mv + d)
        else:
            value = H * (d * mv + mv) + (mv * D if share else H * mv * D) + D
        sizes = _per_module(gpt2, cfg, "kadapt_attention")
        assert len(sizes) == 12 and set(sizes.values()) == {key + value}, (mk, mv, ext, share)


def test_prefix_budgets(gpt2, roberta):
    """§7: PD + D m_p + m_p + 2 m_p N_b D + 2 N_b D while training = 15,391,520 (P = 16, m_p = 800,
    12 layers, D = 768); 2 N_b P D = 294,912 after eject or without reparameterisation."""
    cfg = kadapt.PrefixTuningConfig(prefix_length=16, hidden_size=800)
    for model in (gpt2, roberta):
        assert _count(model, cfg) == 15_391_520
        assert _count(model, kadapt.PrefixTuningConfig(prefix_length=16, hidden_size=800, reparameterize=False)) \
            == 294_912
        kadapt.patch(model, cfg)
        try:
            kadapt.eject(model)
            assert kadapt.trainable_parameters(model)[0] == 294_912
        finally:
            kadapt.unpatch(model)


def test_mam_roberta_budget(roberta):
    """§9 MAM (He et al.) on RoBERTa-base: prefix P = 16, m_p = 800 counted after eject + parallel FFN m = 16."""
    kadapt.patch(roberta, kadapt.preset("he2022_mam_roberta"))
    try:
        before = kadapt.trainable_parameters(roberta)[0]
        assert before == 15_391_520 + 12 * 25_360
        kadapt.eject(roberta)
        assert kadapt.trainable_parameters(roberta)[0] == 599_232 == 12 * (24_576 + 25_360)
    finally:
        kadapt.unpatch(roberta)


def test_t5_prefix_sets():
    """T5: one prefix set (own MLP) each for encoder self, decoder self and cross-attention (default on);
    quirk 18: only the sets used are built."""
    model = t5_base_meta()
    P, m, D, N = 4, 8, 768, 12
    mlp = P * D + D * m + m + 2 * m * N * D + 2 * N * D
    assert _count(model, kadapt.PrefixTuningConfig(prefix_length=P, hidden_size=m)) == 3 * mlp
    assert _count(model, kadapt.PrefixTuningConfig(prefix_length=P, hidden_size=m, cross_attention=False)) == 2 * mlp
