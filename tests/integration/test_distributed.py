"""Multi-process training on 2 CPU processes (gloo): DDP, FSDP2 through ``kadapt.train.distributed.shard``,
FSDP2 as Accelerate wraps a model (``fsdp2_prepare_model``, what ``accelerate launch --use_fsdp
--fsdp_version 2`` and Trainer's ``fsdp`` arguments run on GPUs) and HF Trainer under DDP.

One ``torchrun --nproc_per_node 2`` launch of this file (``python tests/integration/test_distributed.py OUT``)
trains every case for a few steps, each rank taking half of the global batch, and writes the adapter (rank
0) and per-rank JSON results. The tests then check, per case: the adapter file loads into a fresh model and
equals a single-process run with the same global batch (to fp32 rounding), it was written by rank 0 only,
and the frozen backbone is bit-identical to its initial values on every rank. Tiny random models, nothing
downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kadapt  # noqa: E402
from kadapt.train import distributed as D  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
GLOBAL_BATCH = 4
STEPS = 3
LR = 0.1  # SGD: the state differs from the single-process one by LR x (gradient rounding); Adam's
          # normalisation would magnify the rounding of near-zero gradients
VOCAB, LENGTH, LABELS = 64, 12, 3

# (strategy, method, family)
CASES = [(s, m, f) for s in ("ddp", "fsdp") for m in ("lora", "compacter") for f in ("gpt2", "roberta")]
CASES += [("accelerate_fsdp2", m, "gpt2") for m in ("lora", "compacter")]
CASES += [("trainer_ddp", "compacter", "gpt2"), ("trainer_fsdp2", "compacter", "gpt2")]


def case_name(case: tuple[str, str, str]) -> str:
    return "-".join(case)


# ------------------------------------------------------------------------ shared by the workers and tests

def backbone(family: str) -> torch.nn.Module:
    """A tiny random model, the same in every process; no dropout anywhere."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=40, type_vocab_size=1,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         classifier_dropout=0.0, num_labels=LABELS, pad_token_id=1, **common)
        model = transformers.RobertaForSequenceClassification(cfg)
    return model


def config(method: str) -> kadapt.KadaptConfig:
    return (kadapt.LoRAConfig(r=4, dropout=0.0) if method == "lora"
            else kadapt.CompacterConfig(bottleneck_dim=8, phm_dim=4, shared_phm_rule=True))


def build(method: str, family: str) -> torch.nn.Module:
    """The tiny model patched with ``method`` (same initial adapter in every process)."""
    model = backbone(family)
    return kadapt.patch(model, config(method))


def batches(family: str) -> list[dict[str, torch.Tensor]]:
    """STEPS global batches (no padding: every example has the same number of tokens)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, LENGTH), generator=g)
        labels = ids.clone() if family == "gpt2" else torch.randint(0, LABELS, (GLOBAL_BATCH,), generator=g)
        out.append({"input_ids": ids, "labels": labels})
    return out


def train_loop(model: torch.nn.Module, family: str, rank: int, world: int) -> None:
    """SGD on this rank's contiguous share of each global batch."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for batch in batches(family):
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        model(**local).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def trainer_args(output_dir: str, per_device: int) -> "transformers.TrainingArguments":
    return transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=per_device, max_steps=STEPS, learning_rate=LR,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, train_sampling_strategy="sequential",
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        ddp_find_unused_parameters=False)


class AdapterTrainer(transformers.Trainer):
    """A Trainer whose saves hold the adapter only: every rank calls ``save_model`` (Trainer does), the
    adapter is gathered when sharded and rank 0 writes it."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        D.save_adapter(self.model, output_dir or self.args.output_dir)


class FSDP2Trainer(AdapterTrainer):
    """What ``accelerate launch --use_fsdp --fsdp_version 2`` gives the Trainer on GPUs. Accelerate turns
    FSDP on only for accelerators (on CPU processes it runs DDP), so the test sets its state to FSDP2 with
    transformer-based auto wrap after the Accelerator is made."""

    def create_accelerator_and_postprocess(self) -> None:
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        self.made = (self.accelerator.state.distributed_type, getattr(self.accelerator.state, "fsdp_plugin", None))
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True)
        self.accelerator.state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True

    def restore(self) -> None:
        """Put back the (process-wide) Accelerate state the Accelerator was made with."""
        self.accelerator.state.distributed_type, self.accelerator.state.fsdp_plugin = self.made


def trainer_rows(family: str) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i] for k, v in b.items()} for b in batches(family) for i in range(GLOBAL_BATCH)]


def frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full frozen tensors (gathered when sharded: collective)."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in D.unwrap(model).named_parameters() if not p.requires_grad}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------- the worker (torchrun)

def _accelerate_fsdp2(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """Accelerate's own FSDP2 preparation (transformer-based auto wrap from the model's _no_split_modules).
    Accelerate enables FSDP only on accelerators, so its function is called directly with a stand-in for
    the Accelerator's few fields it reads."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  parallelism_config=None, is_main_process=rank == 0, mixed_precision="no",
                                  device=torch.device("cpu"))
    return fsdp2_prepare_model(accelerator, model)


def _groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """FSDP group -> the parameter names it manages (FSDP2 internals, for the shared-rule check)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = fully_shard.state(module)._fsdp_param_group
            params = group.fsdp_params if group is not None else []
            out[name or "<root>"] = [names[id(p.sharded_param)] for p in params]
    return out


def _run_case(case: tuple[str, str, str], out: Path, rank: int, world: int) -> dict:
    import torch.distributed as dist

    strategy, method, family = case
    directory = out / case_name(case)
    model = build(method, family)
    initial = frozen(model)
    result: dict = {}
    trainer = None
    if strategy.startswith("trainer_"):
        cls = FSDP2Trainer if strategy == "trainer_fsdp2" else AdapterTrainer
        trainer = cls(model=model, args=trainer_args(str(directory / "trainer"), GLOBAL_BATCH // world),
                      train_dataset=trainer_rows(family))
        trainer.train()
        model = trainer.model_wrapped
        result["wrapper"] = type(model).__name__
        result["sharded"] = D.is_sharded(model)
    else:
        if strategy == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        elif strategy == "fsdp":
            model = D.shard(model)
        else:
            model = _accelerate_fsdp2(model, rank)
        if strategy != "ddp":
            result["groups"] = _groups(model)
        train_loop(model, family, rank, world)
    after = frozen(model)
    result["frozen_unchanged"] = sorted(initial) == sorted(after) and all(
        torch.equal(initial[n], after[n]) for n in initial)
    result["frozen_digest"] = digest(after)
    writes = []
    original = kadapt.save_adapter
    kadapt.save_adapter = lambda m, d: (writes.append(str(d)), original(m, d))[1]
    try:
        if trainer is not None:
            trainer.save_model(str(directory / "adapter"))
        else:
            D.save_adapter(model, directory / "adapter")
    finally:
        kadapt.save_adapter = original
    if isinstance(trainer, FSDP2Trainer):
        trainer.restore()
    result["writes"] = len(writes)
    if strategy == "fsdp":  # a sharded model reloads the file (patch, shard, load) to the same state
        fresh = D.load_adapter(D.shard(build(method, family)), directory / "adapter")
        reloaded, trained = D.gather_adapter_state(fresh), D.gather_adapter_state(model)
        result["sharded_reload_equal"] = sorted(reloaded) == sorted(trained) and all(
            torch.equal(reloaded[k], trained[k]) for k in trained)
    dist.barrier()
    return result


SWEEP_FAMILIES = ("gpt2", "t5")


def _sweep(rank: int, world: int) -> dict[str, float]:
    """Every method but SAID on the SWEEP_FAMILIES, sharded vs unsharded in this process: 2 SGD steps, no
    dropout; the largest difference of the adapter state relative to its scale."""
    from _models import inputs, tiny, tiny_configs

    def run(family: str, name: str, sharded: bool) -> dict[str, torch.Tensor]:
        model = tiny(family)  # eval mode: no dropout (T5 also drops attention weights functionally)
        cfg = tiny_configs()[name]
        for field in ("dropout", "lora_dropout"):
            if hasattr(cfg, field):
                setattr(cfg, field, 0.0)
        torch.manual_seed(7)
        kadapt.patch(model, cfg)
        if sharded:
            D.shard(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        for step in range(2):
            batch = inputs(family, batch=GLOBAL_BATCH, seed=step)
            labels = batch["decoder_input_ids"] if family == "t5" else batch["input_ids"]
            batch["labels"] = labels.clone(memory_format=torch.contiguous_format)
            if sharded:
                batch = {k: v.chunk(world)[rank] for k, v in batch.items()}
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return {k: v.clone() for k, v in D.gather_adapter_state(model).items()}

    out = {}
    for family in SWEEP_FAMILIES:
        for name in tiny_configs():
            if name == "intrinsic_said":
                continue
            ref, got = run(family, name, False), run(family, name, True)
            scale = max(v.abs().max().item() for v in ref.values())
            err = max((got[k] - ref[k]).abs().max().item() for k in ref) if sorted(got) == sorted(ref) else 1.0
            out[f"{family}-{name}"] = err / max(scale, 1.0)
    return out


def _worker(out: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))  # _models
    torch.set_num_threads(1)
    rank, world = D.init_distributed()
    results = {}
    for case in CASES:
        start = time.perf_counter()
        results[case_name(case)] = _run_case(case, out, rank, world)
        results[case_name(case)]["seconds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    results["sweep"] = _sweep(rank, world)
    results["sweep_seconds"] = round(time.perf_counter() - start, 2)
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    import torch.distributed as dist

    dist.destroy_process_group()


def _cli_worker(record: Path, argv: list[str]) -> int:
    """``kadapt.train.main(argv)`` (what ``python -m kadapt.train`` runs) with its kadapt calls observed: the
    patched model (to check its frozen tensors afterwards), the adapter writes, and the Trainer's setup."""
    import transformers as tf

    models, writes, trainers = [], [], []
    patch, save, train = kadapt.patch, kadapt.save_adapter, tf.Trainer.train

    def observed_patch(model, config):
        models.append(model)
        return patch(model, config)

    def observed_train(self, *args, **kwargs):
        trainers.append({"world_size": self.args.world_size, "wrapper": None,
                         "accepts_loss_kwargs": bool(self.model_accepts_loss_kwargs)})
        out = train(self, *args, **kwargs)
        trainers[-1]["wrapper"] = type(self.model_wrapped).__name__
        return out

    kadapt.patch = observed_patch
    kadapt.save_adapter = lambda m, d: (writes.append(str(d)), save(m, d))[1]
    tf.Trainer.train = observed_train
    from kadapt.train import main

    code = main(argv)
    model_dir = argv[argv.index("--model") + 1]
    pretrained = dict(tf.AutoModelForSequenceClassification.from_pretrained(model_dir).named_parameters())
    frozen_now = frozen(models[0])
    result = {"code": code, "writes": writes, "trainers": trainers, "frozen_digest": digest(frozen_now),
              "frozen_equal_pretrained": all(torch.equal(t, pretrained[n]) for n, t in frozen_now.items()),
              "frozen_count": len(frozen_now)}
    (record / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result, indent=1))
    return code


if __name__ == "__main__":
    if sys.argv[1] == "--cli":
        sys.exit(_cli_worker(Path(sys.argv[2]), sys.argv[3:]))
    _worker(Path(sys.argv[1]))
    sys.exit(0)


# ---------------------------------------------------------------------------------------------- tests

def torchrun(*args: str, timeout: int = 300) -> None:
    """``torchrun --standalone --nproc_per_node WORLD <this file> args`` importing the kadapt this process does."""
    here = str(Path(kadapt.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # the CLI test checks the pipelines choose the CPU themselves
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One torchrun launch training every case on 2 processes."""
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("distributed")
    torchrun(str(out))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _single_process(case: tuple[str, str, str], tmp: Path) -> dict[str, torch.Tensor]:
    strategy, method, family = case
    model = build(method, family)
    if strategy.startswith("trainer_"):
        AdapterTrainer(model=model, args=trainer_args(str(tmp / "trainer"), GLOBAL_BATCH),
                       train_dataset=trainer_rows(family)).train()
    else:
        train_loop(model, family, 0, 1)
    return {k: v.detach().clone() for k, v in kadapt.api.adapter_state(model).items()}


@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_matches_single_process(launched, case, tmp_path):
    out, results = launched
    strategy, method, family = case
    reference = _single_process(case, tmp_path)
    fresh = kadapt.load_adapter(backbone(family), out / case_name(case) / "adapter")  # patches, then loads
    loaded = kadapt.api.adapter_state(fresh)
    assert sorted(loaded) == sorted(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(loaded[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    moved = build(method, family)  # the steps did train: the state is not the initial one
    assert any(not torch.equal(v, reference[k]) for k, v in kadapt.api.adapter_state(moved).items())


@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_written_once_and_backbone_identical(launched, case):
    _, results = launched
    per_rank = [r[case_name(case)] for r in results]
    assert [r["writes"] for r in per_rank] == [1] + [0] * (WORLD - 1)
    assert all(r["frozen_unchanged"] for r in per_rank)
    assert len({r["frozen_digest"] for r in per_rank}) == 1
    if case[0] == "trainer_ddp":
        assert per_rank[0]["wrapper"] == "DistributedDataParallel"
    if case[0] == "trainer_fsdp2":
        assert per_rank[0]["sharded"]


@pytest.mark.parametrize("strategy", ["fsdp", "accelerate_fsdp2"])
def test_shared_rule_in_root_group(launched, strategy):
    """The shared Compacter rule is managed once, by the root's group; adapters by their blocks."""
    _, results = launched
    groups = results[0][case_name((strategy, "compacter", "gpt2"))]["groups"]
    owners = [g for g, names in groups.items() for n in names if n == "kadapt_phm_rule.weight"]
    assert owners == ["<root>"]
    for g, names in groups.items():
        if g.startswith("transformer.h."):
            assert any(".kadapt_adapter." in n for n in names), (g, names)
            assert all(n.startswith(g + ".") for n in names), (g, names)


def test_every_method_sharded_matches_single_process(launched):
    """shard() vs one process for every method (SAID excepted) on GPT-2 and T5 (cross-attention, three prefix
    sets, prompts in the encoder)."""
    from _models import tiny_configs

    _, results = launched
    sweep = results[0]["sweep"]
    assert sorted(sweep) == sorted(f"{f}-{n}" for f in SWEEP_FAMILIES for n in tiny_configs() if n != "intrinsic_said")
    bad = {k: v for k, v in sweep.items() if not v <= 1e-5}
    assert not bad, bad


def test_sharded_model_reloads_adapter(launched):
    _, results = launched
    for r in results:
        for case in CASES:
            if case[0] == "fsdp":
                assert r[case_name(case)]["sharded_reload_equal"], case


# ------------------------------------------------------------------------------- in-process, no launch

@pytest.mark.parametrize("family", ["gpt2", "roberta", "bert", "t5", "llama"])
def test_transformer_blocks(family):
    from _models import tiny  # tests/ is on sys.path under pytest (not needed by the torchrun worker)

    model = kadapt.patch(tiny(family), kadapt.LoRAConfig(r=2))
    blocks = D.transformer_blocks(model)
    expected = {"gpt2": "GPT2Block", "roberta": "RobertaLayer", "bert": "BertLayer", "t5": "T5Block",
                "llama": "LlamaDecoderLayer"}[family]
    assert [type(b).__name__ for b in blocks] == [expected] * (4 if family == "t5" else 2)
    assert len({id(b) for b in blocks}) == len(blocks)


def test_shard_refuses_bad_input():
    model = build("lora", "gpt2")
    with pytest.raises(ValueError, match="not patched"):
        D.shard(kadapt.unpatch(model))
    with pytest.raises(ValueError, match="intrinsic_said.*DDP"):
        D.shard(kadapt.patch(model, kadapt.IntrinsicSAIDConfig(intrinsic_dim=400)))
    with pytest.raises(RuntimeError, match="no process group"):
        D.shard(build("compacter", "gpt2"))
    with pytest.raises(ValueError, match="not patched"):
        D.save_adapter(torch.nn.Linear(2, 2), "unused")


# ------------------------------------------------------------------------------ kadapt-train under torchrun

def test_kadapt_train_nlu_ddp_matches_single_process(tmp_path):
    """``kadapt-train nlu`` on 2 CPU processes (DDP through the Trainer) vs one process with the same global
    batch: same adapter, written by rank 0 only, loading into a fresh model; frozen backbone untouched."""
    pytest.importorskip("accelerate")
    import _train_fixtures as F
    from safetensors.torch import load_file

    from kadapt.train import main

    tok = F.tokenizer("bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=len(tok), max_position_embeddings=64, pad_token_id=0,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    F.write_rows(F.sentiment_rows(16, 0), tmp_path / "train.tsv")  # every sentence 5 words: no padding
    F.write_rows(F.sentiment_rows(8, 1), tmp_path / "dev.tsv")
    method = tmp_path / "compacter.json"
    method.write_text(json.dumps(config("compacter").to_dict()))
    common = ["nlu", "--model", str(tmp_path / "bert"), "--method", str(method), "--train-file",
              str(tmp_path / "train.tsv"), "--validation-file", str(tmp_path / "dev.tsv"), "--max-steps", "3",
              "--eval-steps", "3", "--lr", "1e-2", "--warmup-steps", "0", "--seed", "0"]
    record = tmp_path / "record"
    record.mkdir()
    torchrun("--cli", str(record), *common, "--output-dir", str(tmp_path / "two"), "--batch-size",
             str(GLOBAL_BATCH // WORLD))
    assert main([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", str(GLOBAL_BATCH)]) == 0

    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in range(WORLD)]
    setup = ranks[0]["trainers"][0]
    assert setup["world_size"] == WORLD and setup["wrapper"] == "DistributedDataParallel", (
        f"the Trainer ran each rank alone ({setup}): on CPU processes it needs use_cpu=True (TrainingArguments) "
        f"or ACCELERATE_USE_CPU=true, else every rank trains on the same batches")
    assert not setup["accepts_loss_kwargs"], (
        "the Trainer multiplies this model's loss (a per-example mean) by the world size because its forward "
        "takes **kwargs: gradients are WORLD times too large; set model.accepts_loss_kwargs = False")
    assert [r["code"] for r in ranks] == [0] * WORLD
    assert ranks[0]["writes"] and not any(r["writes"] for r in ranks[1:])
    assert all(r["frozen_equal_pretrained"] and r["frozen_count"] > 0 for r in ranks)
    assert len({r["frozen_digest"] for r in ranks}) == 1

    one, two = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert sorted(one) == sorted(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    fresh = kadapt.load_adapter(transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert"),
                                tmp_path / "two")
    state = kadapt.api.adapter_state(fresh)
    assert all(torch.equal(state[k].detach(), two[k]) for k in two)
