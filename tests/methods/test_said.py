"""Intrinsic-SAID / DID (kadapt/methods/said.py): the function θ_i = θ_{i,0} + λ_i P_i z against a reference
built independently (the Fastfood reference op and an unpatched copy of the model), exact gradients, the tie,
θ recomputed once per change of z/λ (never per forward), checkpointing, save/load bit for bit with the base
model's identity, counts, refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import kadapt
from kadapt.methods.said import IntrinsicSAID
from kadapt.ops.fastfood import _GradScale, default_lengths, fastfood_one_reference, fastfood_plan
from kadapt.patching import is_patched
from _models import ALL_FAMILIES, enable_checkpointing, inputs, output, t5_base_meta, tiny

DIM = 300


def _said(model) -> IntrinsicSAID:
    return model.kadapt_said


def _randomize(model, seed: int = 0) -> None:
    """z and λ off their init (z = 0 would make θ = θ_0)."""
    g = torch.Generator().manual_seed(seed)
    said = _said(model)
    with torch.no_grad():
        said.z.copy_(0.05 * torch.randn(said.z.shape, generator=g))
        if said.lam is not None:
            said.lam.copy_(1 + 0.5 * torch.randn(said.lam.shape, generator=g))


def _reference(patched, base, grad_scale_compat: bool = False, untied_head: bool = False):
    """θ built from the reference op on leaves (z, λ), and a function running the unpatched ``base`` copy with
    those θ through torch.func.functional_call: (z, λ, run)."""
    said = _said(patched)
    z = said.z.detach().clone().requires_grad_(True)
    lam = None if said.lam is None else said.lam.detach().clone().requires_grad_(True)
    plan = fastfood_plan(said.sizes, said.seed, said.z.numel(), said.lengths)
    ids = {id(p): i for i, p in enumerate(dict.fromkeys(base.parameters()))}
    thetas = []
    for i, p in enumerate(dict.fromkeys(base.parameters())):
        zi = _GradScale.apply(z, 1.0 / plan.lengths[i]) if grad_scale_compat else z
        v = fastfood_one_reference(zi, plan, i).view(p.shape)
        thetas.append(p.detach() + (v if lam is None else lam[i] * v))
    head = base.get_output_embeddings() if untied_head else None

    def run(**kw):
        params = {}
        for name, p in base.named_parameters(remove_duplicate=False):
            if head is not None and name.startswith(_module_name(base, head)):
                continue
            params[name] = thetas[ids[id(p)]]
        return torch.func.functional_call(base, params, args=(), kwargs=kw, tie_weights=False, strict=False)

    return z, lam, run


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _loss_kwargs(family: str) -> dict:
    kw = inputs(family)
    kw["attention_mask"][1, -2:] = 0
    if family in ("roberta", "bert"):
        kw["labels"] = torch.tensor([0, 2])
    elif family == "t5":
        kw["labels"] = kw["decoder_input_ids"].clone()
    else:
        kw["labels"] = kw["input_ids"]
    return kw


# --------------------------------------------------------------------------------------------- function

@pytest.mark.parametrize("said", [True, False], ids=["said", "did"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_forward_and_gradients_match_reference(family, said):
    torch.manual_seed(0)
    model = tiny(family)
    base = copy.deepcopy(model)
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM, said=said, seed=11))
    _randomize(model)
    model.eval()  # dropout off: the reference run must see the same function
    kw = _loss_kwargs(family)
    out = model(**kw)
    z, lam, run = _reference(model, base)
    ref = run(**kw)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(_said(model).z.grad, z.grad, rtol=1e-4, atol=1e-6)
    if said:
        torch.testing.assert_close(_said(model).lam.grad[:-1], lam.grad[:-1], rtol=1e-4, atol=1e-6)
        assert _said(model).lam.grad[-1] == 0  # the unused last entry (kept so that the total is d_I)
    else:
        assert _said(model).lam is None


def test_compat_grad_scale_matches_reference():
    model = tiny("gpt2")
    base = copy.deepcopy(model)
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM, compat_said_grad_scale=True))
    _randomize(model)
    kw = _loss_kwargs("gpt2")
    model(**kw).loss.backward()
    z, lam, run = _reference(model, base, grad_scale_compat=True)
    run(**kw).loss.backward()
    torch.testing.assert_close(_said(model).z.grad, z.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(_said(model).lam.grad[:-1], lam.grad[:-1], rtol=1e-4, atol=1e-7)


def test_compat_crop_lengths():
    model = tiny("t5")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM, compat_said_crop=True))
    said = _said(model)
    assert said.lengths == tuple(1 << (n - 1).bit_length() for n in said.sizes)
    assert min(said.lengths) < said.z.numel()  # some tensors see only z[:L_i] (ledger #4)
    _randomize(model)
    base = copy.deepcopy(model)
    kadapt.unpatch(base)
    with torch.no_grad():
        torch.testing.assert_close(output(model, "t5"), _reference(model, base)[2](**inputs("t5")).logits,
                                   rtol=1e-5, atol=1e-6)


def test_the_tie_is_kept_and_compat_unties():
    model = tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    said = _said(model)
    assert sum(p is model.lm_head.weight for p in said.originals) == 1  # the tied tensor counted once
    _randomize(model)
    base = copy.deepcopy(model)
    kadapt.unpatch(base)
    with torch.no_grad():
        torch.testing.assert_close(output(model, "gpt2"), _reference(model, base)[2](**inputs("gpt2")).logits,
                                   rtol=1e-5, atol=1e-6)
    untied = tiny("gpt2")
    kadapt.patch(untied, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM, compat_said_untied_lm_head=True))
    _randomize(untied)
    with torch.no_grad():
        got = output(untied, "gpt2")
        torch.testing.assert_close(got, _reference(untied, base, untied_head=True)[2](**inputs("gpt2")).logits,
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, output(model, "gpt2"))
    with pytest.raises(ValueError, match="compat_said_untied_lm_head"):
        kadapt.merge(untied)
    assert is_patched(untied)


# ------------------------------------------------------------------------------------- when θ is computed

def _count_recomputes(monkeypatch) -> list:
    calls = []
    original = IntrinsicSAID.recompute

    def spy(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(IntrinsicSAID, "recompute", spy)
    return calls


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_recomputed_once_per_optimizer_step_never_per_forward(monkeypatch, fused):
    """Fused AdamW updates z without bumping its version counter: the optimizer hook catches that step."""
    calls = _count_recomputes(monkeypatch)
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused,
                            foreach=None if fused else True)
    z_versions = []
    kw = _loss_kwargs("gpt2")
    model.train()
    thetas = []
    for _ in range(3):
        for _ in range(2):  # gradient accumulation: two forwards + backwards per step
            model(**kw).loss.backward()
        thetas.append(_said(model).cache[0].clone())
        z_versions.append(_said(model).z._version)
        opt.step()
        opt.zero_grad()
    assert len(calls) == 3  # the first forward, then once after each of the first two steps
    assert not torch.equal(thetas[0], thetas[1]) and not torch.equal(thetas[1], thetas[2])
    if fused:
        assert len(set(z_versions)) == 1  # the case the hook exists for
    model.eval()
    with torch.no_grad():
        model.generate(kw["input_ids"][:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
        model(**inputs("gpt2"))
    assert len(calls) == 4  # the third step's update, once; generation and eval forwards reuse θ
    kadapt.said_step(model)
    assert len(calls) == 5


def test_gradient_accumulation_and_checkpointing():
    kw = _loss_kwargs("gpt2")

    def grads(checkpoint: dict | None, twice: bool):
        torch.manual_seed(0)
        model = tiny("gpt2")
        kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
        _randomize(model)
        model.train()  # checkpointing runs in training mode only; dropout off for comparable runs
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if checkpoint is not None:
            enable_checkpointing(model, checkpoint)
        for _ in range(2 if twice else 1):
            loss = model(**kw).loss
            (loss if twice else 2 * loss).backward()
        said = _said(model)
        return said.z.grad.clone(), said.lam.grad.clone()

    plain = grads(None, twice=False)
    for ckpt in (None, {"use_reentrant": False}, {"use_reentrant": True}):
        got = grads(ckpt, twice=True)
        torch.testing.assert_close(got[0], plain[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], plain[1], rtol=1e-5, atol=1e-6)


def test_generate_with_cache_matches_reference():
    model = tiny("gpt2")
    base = copy.deepcopy(model)
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    _randomize(model)
    z, lam, run = _reference(model, base)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for p, t in zip(dict.fromkeys(merged.parameters()), _said(model).theta()):
            p.copy_(t)
    ids = inputs("gpt2")["input_ids"][:, :5]
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        want = merged.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_slots_restored_when_the_forward_raises():
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    with pytest.raises(Exception):
        model(input_ids=torch.full((1, 3), 10 ** 6))  # index out of range inside the embedding
    assert all(isinstance(p, torch.nn.Parameter) for m in model.modules() for p in m._parameters.values()
               if p is not None)


# ------------------------------------------------------------------------------------------- save / load

def test_adapter_file_reproduces_the_trained_model(tmp_path):
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    tiny("t5").save_pretrained(base_dir)
    model = type(tiny("t5")).from_pretrained(base_dir)
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM, seed=123))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kw = _loss_kwargs("t5")
    model.train()
    for _ in range(2):
        model(**kw).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = output(model, "t5")
    kadapt.save_adapter(model, tmp_path / "said")
    meta = json.loads((tmp_path / "said" / kadapt.api.CONFIG_NAME).read_text())
    assert meta["config"]["seed"] == 123
    identity = meta["method_state"]["intrinsic_said"]
    assert identity["tensors"] == len(_said(model).originals) and len(identity["fingerprint"]) == identity["tensors"]
    from safetensors.torch import load_file
    assert sorted(load_file(str(tmp_path / "said" / kadapt.api.WEIGHTS_NAME))) == ["kadapt_said.lam", "kadapt_said.z"]

    fresh = type(model).from_pretrained(base_dir).eval()
    kadapt.load_adapter(fresh, tmp_path / "said")
    with torch.no_grad():
        assert torch.equal(output(fresh, "t5"), expected)

    other = tiny("t5", seed=9)  # other base weights
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="other base weights"):
        kadapt.load_adapter(other, tmp_path / "said")
    assert not is_patched(other)
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())


def test_merge_keeps_the_tie_and_the_function():
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    _randomize(model)
    with torch.no_grad():
        before = output(model, "gpt2")
    kadapt.merge(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(output(model, "gpt2"), before)


# ---------------------------------------------------------------------------------------- counts, refusals

def test_t5_base_counts():
    """METHODS.md §4/§5: K = 257 tensors after the resize (tied embedding once), SAID trains d_I = 20,000."""
    model = t5_base_meta()
    kadapt.patch(model, kadapt.preset("compacter_paper.intrinsic_said"))
    said = _said(model)
    assert len(said.originals) == 257 and sum(said.sizes) == 222_882_048
    assert said.z.numel() == 19_742 and said.lam.numel() == 258
    assert kadapt.trainable_parameters(model)[0] == 20_000
    did = t5_base_meta()
    kadapt.patch(did, kadapt.IntrinsicSAIDConfig(intrinsic_dim=20_000, said=False))
    assert kadapt.trainable_parameters(did)[0] == 20_000 and _said(did).lam is None
    # ΣL_i with kadapt's default L_i = 2^⌈log₂ max(N_i, d_z)⌉: 388.0 M (METHODS.md §4); with the crop, 385.9 M
    assert round(sum(default_lengths(said.sizes, said.z.numel())) / 1e6, 1) == 388.0
    assert round(sum(1 << (n - 1).bit_length() for n in said.sizes) / 1e6, 1) == 385.9


def test_refusals_leave_the_model_untouched():
    model = tiny("t5")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"intrinsic_dim=10 .*K=47"):
        kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=10))
    with pytest.raises(ValueError, match="cannot be composed"):
        kadapt.patch(model, [kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM), kadapt.LoRAConfig(r=2)])
    assert not is_patched(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_task_head_is_projected_not_trained():
    model = tiny("roberta")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["kadapt_said.z", "kadapt_said.lam"]
    head = model.classifier.out_proj.weight
    assert any(p is head for p in _said(model).originals)


def test_triton_backend_same_function():
    """The patched model on the Triton Fastfood kernels (the interpreter here) = on the reference: forward and
    the gradients of z and λ."""
    results = []
    try:
        for backend in ("reference", "triton"):
            kadapt.set_backend(backend)
            model = tiny("gpt2", hidden=16)
            kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=120, seed=3))
            _randomize(model)
            kw = _loss_kwargs("gpt2")
            out = model(**kw)
            out.loss.backward()
            results.append((out.logits.detach(), _said(model).z.grad, _said(model).lam.grad))
    finally:
        kadapt.set_backend("auto")
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- robustness (review findings)

def test_inference_mode_first_then_training():
    """A first forward under inference_mode must not leave inference tensors in the θ cache."""
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    with torch.inference_mode():
        model(**inputs("gpt2"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**_loss_kwargs("gpt2")).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.inference_mode():
        model(**inputs("gpt2"))


def test_deepcopy_after_a_forward_trains_with_fused_adamw():
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    model(**_loss_kwargs("gpt2")).loss.backward()
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, fused=True)
    twin(**_loss_kwargs("gpt2")).loss.backward()
    opt.step()
    with torch.no_grad():
        after_step = output(twin, "gpt2")
        kadapt.said_step(twin)
        assert torch.equal(output(twin, "gpt2"), after_step)  # the step was seen: θ already current
        assert not torch.equal(after_step, output(model, "gpt2"))


def test_memory_is_freed_after_backward_and_del():
    import gc
    import weakref

    model = tiny("gpt2")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    model.train()
    model(**_loss_kwargs("gpt2")).loss.backward()
    refs = [weakref.ref(model.transformer.wte.weight), weakref.ref(_said(model).cache[0])]
    del model
    gc.collect()
    assert all(r() is None for r in refs)


def test_interrupt_inside_a_module_then_next_forward_and_unpatch():
    """A KeyboardInterrupt skips always_call hooks: the next forward and unpatch put θ_0 back."""
    model = tiny("gpt2")
    with torch.no_grad():
        base = output(model, "gpt2")
    originals = {(n, k): p for n, m in model.named_modules() for k, p in m._parameters.items() if p is not None}
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    _randomize(model)
    with torch.no_grad():
        want = output(model, "gpt2")

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = model.transformer.h[0].mlp.c_fc.register_forward_pre_hook(interrupt)  # after kadapt's pre-hook
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        output(model, "gpt2")
    handle.remove()
    assert not isinstance(model.transformer.h[0].mlp.c_fc._parameters["weight"], torch.nn.Parameter)
    with torch.no_grad():
        assert torch.equal(output(model, "gpt2"), want)
    handle = model.transformer.h[1].attn.c_proj.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        output(model, "gpt2")
    handle.remove()
    kadapt.unpatch(model)
    assert all(m._parameters[k] is p for (n, k), p in originals.items() for m in [model.get_submodule(n)])
    with torch.no_grad():
        assert torch.equal(output(model, "gpt2"), base)


def test_concurrent_forwards_from_threads():
    import threading

    model = tiny("gpt2")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    _randomize(model)
    batches = [inputs("gpt2", seed=s) for s in range(4)]
    with torch.no_grad():
        want = [output(model, "gpt2", **b) for b in batches]
    wrong = []

    def work(i):
        for _ in range(15):
            with torch.no_grad():
                if not torch.equal(output(model, "gpt2", **batches[i]), want[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_load_into_the_same_base_in_bf16_and_refusals(tmp_path):
    base_dir = tmp_path / "base"
    tiny("gpt2").save_pretrained(base_dir)
    cls = type(tiny("gpt2"))
    model = cls.from_pretrained(base_dir)
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    _randomize(model)
    kadapt.save_adapter(model, tmp_path / "said")
    half = cls.from_pretrained(base_dir, dtype=torch.bfloat16)
    kadapt.load_adapter(half, tmp_path / "said")  # the same base rounded to bf16 is the same base
    with torch.no_grad():
        torch.testing.assert_close(output(half, "gpt2").float(), output(model, "gpt2"), rtol=0.1, atol=0.1)
    other = cls.from_pretrained(base_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    with pytest.raises(ValueError, match="other base weights"):
        kadapt.load_adapter(other, tmp_path / "said")
    meta_path = tmp_path / "said" / kadapt.api.CONFIG_NAME
    meta = json.loads(meta_path.read_text())
    del meta["method_state"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lacks the base model's identity"):
        kadapt.load_adapter(cls.from_pretrained(base_dir), tmp_path / "said")


def test_recomputed_after_to_float64():
    model = tiny("t5")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    _randomize(model)
    with torch.no_grad():
        output(model, "t5")
    model.double()
    base = copy.deepcopy(model)
    kadapt.unpatch(base)
    with torch.no_grad():
        got = output(model, "t5")
        assert got.dtype == torch.float64 and all(t.dtype == torch.float64 for t in _said(model).cache)
        torch.testing.assert_close(got, _reference(model, base)[2](**inputs("t5")).logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("compat", ["crop", "untied"])
def test_compat_gradients_match_reference(compat):
    model = tiny("gpt2")
    base = copy.deepcopy(model)
    flag = {"crop": "compat_said_crop", "untied": "compat_said_untied_lm_head"}[compat]
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM, **{flag: True}))
    _randomize(model)
    kw = _loss_kwargs("gpt2")
    model(**kw).loss.backward()
    z, lam, run = _reference(model, base, untied_head=compat == "untied")
    run(**kw).loss.backward()
    torch.testing.assert_close(_said(model).z.grad, z.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_said(model).lam.grad[:-1], lam.grad[:-1], rtol=1e-4, atol=1e-6)


def test_t5_generate_after_a_step_matches_merged():
    """T5's generate calls the encoder directly (not the model's forward): θ must be current there too."""
    model = tiny("t5")
    kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=DIM))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, fused=True)
    model.train()
    model(**_loss_kwargs("t5")).loss.backward()
    opt.step()
    model.eval()
    ids = inputs("t5")["input_ids"]
    with torch.no_grad():
        got = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    merged = copy.deepcopy(model)
    kadapt.merge(merged)
    with torch.no_grad():
        assert torch.equal(got, merged.generate(input_ids=ids, max_new_tokens=6, do_sample=False))
