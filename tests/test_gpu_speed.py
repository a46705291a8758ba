"""The speed path on a GPU: varlen attention, the fused LoRA layer (bf16 and 4-bit) and the whole fast
path against the plain one on the standard workload. Run on the device machine:

    source .gpu/prelude.sh && python3 -m pytest -m gpu -q tests/test_gpu_speed.py
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from peftcli import activation_offload, bench, cpu_embedding, fused_lora, methods, packing, params, speed, varlen
from peftcli.models import random_config
from peftcli.packing import PackedCollator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class CausalModule(torch.nn.Module):
    is_causal = True


def worst_error(value, reference):
    return (value.float() - reference.float()).abs().max().item()


def per_sequence_sdpa(q, k, v, lengths):
    """(1, heads, tokens, dim) layouts attended one sequence at a time; returns (tokens, heads, dim)."""
    out, start = [], 0
    for n in lengths:
        piece = [t[:, :, start:start + n] for t in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*piece, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        start += n
    return torch.cat(out)


def check_varlen_matches_per_sequence_sdpa(device: str):
    """Forward and backward of the packed call equal per-sequence sdpa within bf16 rounding: the error of each
    against a float32 reference is at most twice sdpa's own bf16 error (plus a rounding step)."""
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [100, 300, 50, 7], 32, 8, 128
    total = sum(lengths)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    leaves = [torch.randn(1, total, h, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
              for h in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(total, heads, dim, device=device, dtype=torch.bfloat16)

    def run(kind):
        q, k, v = (t.transpose(1, 2) for t in leaves)  # (1, h, tokens, dim) views, as the model hands them over
        if kind == "varlen":
            out = varlen.varlen_attention_forward(CausalModule(), q, k, v, None, scaling=dim ** -0.5,
                                                  position_ids=positions)[0][0]
        else:
            if kind == "float32":
                q, k, v = q.float(), k.float(), v.float()
            out = per_sequence_sdpa(q, k, v, lengths)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
        return [out, *grads]

    reference, sdpa, packed = run("float32"), run("sdpa"), run("varlen")
    for name, r, s, p in zip(["out", "dq", "dk", "dv"], reference, sdpa, packed):
        bound = 2 * worst_error(s, r) + 2 ** -8 * r.abs().max().item()
        assert worst_error(p, r) <= bound, f"{name}: varlen {worst_error(p, r):.4g} > {bound:.4g}"


def check_varlen_unpads_a_padded_batch(device: str):
    torch.manual_seed(1)
    q = torch.randn(2, 32, 64, 128, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 8, 64, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, 64, dtype=torch.bool, device=device)
    mask[1, 40:] = False
    out = varlen.varlen_attention_forward(CausalModule(), q, k, v, mask, scaling=128 ** -0.5)[0]
    first = per_sequence_sdpa(q[:1], k[:1], v[:1], [64])
    second = per_sequence_sdpa(q[1:, :, :40], k[1:, :, :40], v[1:, :, :40], [40])
    assert worst_error(out[0], first) < 3e-2 and worst_error(out[1, :40], second) < 3e-2
    assert out[1, 40:].abs().max().item() == 0


def small_llama(device: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=bench.PROJECTIONS,
                                            task_type="CAUSAL_LM", init_lora_weights=False))


def loss_and_grads(model, ids, device: str):
    model.zero_grad()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), [p.grad.float().clone() for p in model.parameters() if p.requires_grad]


def check_fused_lora_matches_peft(model, device: str):
    """bf16 under autocast, as the Trainer runs it: same loss, gradients equal within bf16 rounding."""
    ids = torch.randint(0, 1000, (2, 64), device=device)
    expected_loss, expected = loss_and_grads(model, ids, device)
    assert fused_lora.install(model) == 14
    loss, grads = loss_and_grads(model, ids, device)
    fused_lora.uninstall(model)
    assert loss == pytest.approx(expected_loss, rel=1e-2)
    for e, g in zip(expected, grads):
        assert worst_error(g, e) <= 0.05 * e.abs().max().item() + 1e-6


def check_profiles_learn_like_the_plain_path(device: str, size: str, steps: int = 25):
    """The standard workload's model, adapter and rows: the fast profile (packing, varlen attention, liger, fused
    LoRA), the lean one (the same, split into micro-batches by memory, checkpointed layers, its optimizer) and
    the plain path (padded batches, sdpa, peft's layers, AdamW) train on the same groups of 4 rows; their
    losses agree within 1% at every step to the last. The plain path runs first: liger patches RoPE globally."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, set_seed

    vocab = random_config(bench.SIZES[size]).vocab_size
    rows = bench.standard_rows(vocab)[:4 * steps]
    examples = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in rows]
    groups = [list(range(i, i + 4)) for i in range(0, len(rows), 4)]
    pad = DataCollatorForSeq2Seq(bench._placeholder_tokenizer(), padding=True, label_pad_token_id=-100)
    losses, splits = {}, {}
    for path in ("plain", "fast", "lean"):
        recipe = bench.standard_recipe(size, qlora=False, steps=steps,
                                       overrides=[f"train.profile={'lean' if path == 'lean' else 'fast'}"])
        model, _ = bench._standard_model(bench.Workload("standard", recipe, size=size), device)
        set_seed(recipe.train.seed)
        model = methods.attach(model, recipe.method)
        if path == "plain":
            model.get_base_model().config.use_cache = False
            steps_batches = [[pad([examples[i] for i in g])] for g in groups]
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.train.lr)
        else:
            plan = speed.plan(recipe, model, Dataset.from_list(examples), device)
            assert plan.packing and plan.liger and plan.attention == varlen.NAME and plan.fused_lora
            _, collate = speed.prepare(plan, model, examples, pad)
            assert plan.fused_layers == 7 * model.config.num_hidden_layers
            steps_batches = [[collate([{"pack": [g[j] for j in micro]}])
                              for micro in packing.token_budget_batches([len(rows[i]) for i in g], plan.tokens_per_batch)]
                             for g in groups]
            splits[path] = (plan.micro_batches, plan.checkpointed, params.optimizer_for(recipe.train, cuda=True))
            optimizer = optimizer_named(splits[path][2], [p for p in model.parameters() if p.requires_grad],
                                        recipe.train.lr)
        model.train()
        losses[path] = [train_step(model, optimizer, micro_batches, device) for micro_batches in steps_batches]
        del model, optimizer
        torch.cuda.empty_cache()
    assert splits["lean"][0] > 1 and splits["lean"][1] > 0, splits  # lean did split and checkpoint
    for path in ("fast", "lean"):
        assert all(math.isfinite(x) for x in losses[path])
        for plain, other in zip(losses["plain"], losses[path]):
            assert other == pytest.approx(plain, rel=0.01), (path, splits, losses)
    print(f"step {steps} loss: plain {losses['plain'][-1]:.4f}, fast {losses['fast'][-1]:.4f}, "
          f"lean {losses['lean'][-1]:.4f} ({splits['lean']})")


def optimizer_named(name: str, trainable, lr: float):
    """The optimizer `peft train` resolves train.optim to on a GPU."""
    if name == "adamw_bnb_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(trainable, lr=lr)
    assert name == "adamw_torch_fused", name
    return torch.optim.AdamW(trainable, lr=lr, fused=True)


def train_step(model, optimizer, micro_batches, device: str) -> float:
    """One optimizer step over micro-batches, each loss weighted by its share of the step's predicted tokens
    (as the Trainer does with num_items_in_batch); returns the step's loss."""
    counts = [int((b["labels"][..., 1:] != -100).sum()) for b in micro_batches]
    total = 0.0
    for batch, count in zip(micro_batches, counts):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**batch).loss * (count / sum(counts))
        loss.backward()
        total += loss.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def test_varlen_attention_equals_per_sequence_sdpa_forward_and_backward():
    check_varlen_matches_per_sequence_sdpa("cuda")


def test_varlen_attention_unpads_padded_batches():
    check_varlen_unpads_a_padded_batch("cuda")


def test_fused_lora_matches_peft_in_bf16():
    check_fused_lora_matches_peft(lora(small_llama("cuda", torch.bfloat16)), "cuda")


def test_fused_lora_matches_peft_on_a_4bit_base(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    small_llama("cuda", torch.bfloat16).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=quantization,
                                                 device_map={"": 0})
    check_fused_lora_matches_peft(lora(model), "cuda")


def test_the_fast_and_lean_losses_equal_the_plain_path_on_the_standard_workload():
    check_profiles_learn_like_the_plain_path("cuda", "1b")


def test_an_embedding_table_in_cpu_memory_gives_the_gpu_the_same_rows():
    """The rows gathered on the CPU and copied asynchronously equal the GPU table's lookup, and the
    next computation on them sees the copied values (the copy is ordered before it on the stream)."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(5000, 256, dtype=torch.bfloat16).requires_grad_(False)
    on_cpu = cpu_embedding.CpuEmbedding(5000, 256, _weight=table.weight.detach().clone(), _freeze=True)
    on_gpu = table.to("cuda")
    for _ in range(3):  # pinned buffers are reused by then: each lookup still sees its own rows
        ids = torch.randint(0, 5000, (2, 3000), device="cuda")
        rows = on_cpu(ids)
        assert rows.device.type == "cuda" and rows.shape == (2, 3000, 256)
        assert torch.equal((rows * 2).cpu(), (on_gpu(ids) * 2).cpu())


def test_offloaded_checkpoints_give_the_same_gradients_and_leave_the_gpu():
    """Checkpointed blocks whose inputs go to CPU memory on a side stream and come back ahead of backward:
    bit-identical gradients over two backward passes in a row (as micro-batches run), and the inputs held
    in CPU memory between forward and backward."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU())
                                 for _ in range(6)).cuda()
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)

    def plain_checkpoint(function, hidden):
        return torch.utils.checkpoint.checkpoint(function, hidden, use_reentrant=False)

    def forward(checkpoint):
        hidden = x
        for block in blocks:
            hidden = checkpoint(block, hidden) + hidden
        return hidden.square().mean()

    def gradients(checkpoint):
        for _ in range(2):
            blocks.zero_grad(set_to_none=True)
            x.grad = None
            forward(checkpoint).backward()
        return [x.grad.clone(), *(p.grad.clone() for p in blocks.parameters())]

    def held_after_forward(checkpoint) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
        loss = forward(checkpoint)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # settles the blocks freed once the side stream's copies were done
        held = torch.cuda.memory_allocated() - start
        loss.backward()
        return held

    offload = activation_offload.StreamOffload()
    assert all(torch.equal(a, b) for a, b in zip(gradients(plain_checkpoint), gradients(offload.checkpoint)))
    assert offload.saved == [] and offload.waiting == 0
    inputs = 5 * 4096 * 1024 * 4  # the float32 inputs of blocks 2-6 (block 1's is x itself)
    assert held_after_forward(plain_checkpoint) - held_after_forward(offload.checkpoint) >= 0.9 * inputs


def test_varlen_attends_mixed_dtypes_in_one_16_bit_dtype():
    """IA3 scales k and v by float32 vectors: q in bf16 next to float32 k and v attends as all-bf16 does, in q's dtype."""
    torch.manual_seed(0)
    positions = torch.cat([torch.arange(50), torch.arange(30)])[None].cuda()
    q = torch.randn(1, 32, 80, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 80, 64, device="cuda") for _ in range(2))
    mixed = varlen.varlen_attention_forward(CausalModule(), q, k, v, None, scaling=64 ** -0.5, position_ids=positions)[0]
    bf16 = varlen.varlen_attention_forward(CausalModule(), q, k.bfloat16(), v.bfloat16(), None, scaling=64 ** -0.5,
                                           position_ids=positions)[0]
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed, bf16)
