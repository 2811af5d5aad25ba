"""Teachers held in the precision asked (``--precision bf16|fp16``): hf: directories and state dicts are
loaded straight into that dtype, other formats cast after loading, the dump's rows equal a bf16 run of
the same model, and loading peaks at about the weights' size in that dtype (measured in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from data_factories import causal_bag, read_plain, spec
from hf_factories import tiny_llama
from torch import nn

from logit_cache import DumpConfig, dump
from logit_cache.errors import UsageError
from logit_cache.teachers import load_teacher

HERE = Path(__file__).resolve().parent
VOCAB = 96


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama") / "tiny"
    tiny_llama().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat token array: 6 windows of 8 tokens (all the same length: no padding in a batch)."""
    path = tmp_path_factory.mktemp("tokens") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(2, VOCAB, size=48).astype(np.int64))
    return path


class TiedLM(nn.Module):
    """An embedding tied to the output head, a norm and an integer buffer: what a cast must and must not touch."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.arange(3, dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_hf_weights_are_loaded_in_the_precision_asked(llama_dir: Path, precision: str, dtype: torch.dtype) -> None:
    teacher = load_teacher(f"hf:{llama_dir}", precision=precision)
    assert {p.dtype for p in teacher.module.parameters()} == {dtype}
    assert teacher.dtype == dtype
    reference = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=dtype)
    for (name, got), want in zip(teacher.module.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    # the default stays float32, whatever the directory was saved in
    assert {p.dtype for p in load_teacher(f"hf:{llama_dir}").module.parameters()} == {torch.float32}


def test_state_dict_weights_are_cast_one_by_one_ties_and_integer_buffers_kept(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedLM().eval()
    path = tmp_path / "tied.pt"
    torch.save(model.state_dict(), path)
    teacher = load_teacher(path, arch=f"{__file__}:TiedLM", precision="bf16")
    module = teacher.module
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert module.steps.dtype == torch.int64 and module.steps.tolist() == [0, 1, 2]
    assert module.head.weight.data_ptr() == module.embed.weight.data_ptr()  # still one tensor
    ids = torch.randint(0, VOCAB, (2, 5))
    expected = model.to(torch.bfloat16)(ids)
    torch.testing.assert_close(module(ids), expected, rtol=0, atol=0)


def test_a_factory_that_cannot_build_on_meta_is_built_in_the_dtype(tmp_path: Path) -> None:
    from data_factories import needs_real_tensors

    path = tmp_path / "real.pt"
    torch.save(needs_real_tensors().state_dict(), path)
    teacher = load_teacher(path, arch=spec("needs_real_tensors"), precision="fp16")
    floats = [t for t in (*teacher.module.parameters(), *teacher.module.buffers()) if t.is_floating_point()]
    assert floats and {t.dtype for t in floats} == {torch.float16}


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
def test_torchscript_and_pickled_teachers_are_cast_after_loading(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedLM().eval()
    script = tmp_path / "tied.ts"
    torch.jit.save(torch.jit.script(model), script)
    pickled = tmp_path / "tied-module.pt"
    torch.save(model, pickled)
    for teacher in (load_teacher(script, precision="bf16"), load_teacher(pickled, precision="bf16", trust_checkpoint=True)):
        assert {p.dtype for p in teacher.module.parameters()} == {torch.bfloat16}
    with pytest.raises(UsageError, match="--precision 'int8' is not one of fp32, bf16, fp16"):
        load_teacher(script, precision="int8")


def _bf16_topk(model: nn.Module, inputs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows a dump should write: the bf16 model run as the dump documents it (under bf16 autocast), top-k in float32."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(inputs)
    logits = (output.logits if hasattr(output, "logits") else output).float().reshape(-1, VOCAB)
    top = torch.topk(logits, k, dim=-1)
    return top.values.numpy(), top.indices.numpy(), torch.logsumexp(logits, -1).numpy()


def test_a_bf16_dump_of_an_hf_teacher_equals_a_bf16_run_of_it(llama_dir: Path, tokens: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "bf16"
    result = cli("dump", "--teacher", f"hf:{llama_dir}", "--dataset", f"tokens:{tokens}", "--dataset-kwargs",
                 '{"seq_len": 8, "stride": 8}', "--out", out, "--topk", "5", "--dtype", "float32", "--precision", "bf16",
                 "--batch-size", "6", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    windows = torch.from_numpy(np.load(tokens)).reshape(6, 8)
    values, ids, lse = _bf16_topk(model, windows, 5)
    np.testing.assert_array_equal(read_plain(out, "topk_indices"), ids)
    np.testing.assert_array_equal(read_plain(out, "topk_logits"), values)
    np.testing.assert_allclose(read_plain(out, "logsumexp"), lse, rtol=1e-6)
    # and not what the float32 model gives: the weights really were bf16
    with torch.inference_mode():
        fp32 = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)(windows).logits.reshape(-1, VOCAB)
    assert not np.allclose(read_plain(out, "topk_logits"), torch.topk(fp32, 5, -1).values.numpy(), rtol=0, atol=1e-6)
    assert json.loads((out / "manifest.json").read_text())["dump"]["precision"] == "bf16"


def test_a_bf16_dump_of_a_state_dict_teacher_equals_a_bf16_run_of_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = causal_bag(vocab=VOCAB).eval()
    path = tmp_path / "bag.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "bag-bf16"
    dump(DumpConfig(teacher=str(path), arch=spec("causal_bag"), arch_kwargs={"vocab": VOCAB}, dataset=spec("ragged_tokens"),
                    dataset_kwargs={"vocab": VOCAB, "n": 6, "max_len": 8}, out=str(out), mode="topk", k=4, dtype="float32",
                    precision="bf16", batch_size=1, device="cpu", quiet=True))
    from data_factories import RaggedTokens

    bf16 = model.to(torch.bfloat16)
    parts = [_bf16_topk(bf16, seq[None], 4) for seq in RaggedTokens(n=6, vocab=VOCAB, max_len=8).seqs]
    np.testing.assert_array_equal(read_plain(out, "topk_indices"), np.concatenate([p[1] for p in parts]))
    np.testing.assert_array_equal(read_plain(out, "topk_logits"), np.concatenate([p[0] for p in parts]))


# -- peak host memory of loading ----------------------------------------------------------------------

_MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from logit_cache.teachers import load_teacher

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    spec, arch, warm, warm_arch = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4] or None
    load_teacher(warm, arch=warm_arch, precision="bf16")  # imports and lazy modules out of the way
    try:  # reset the high-water mark to what is resident now
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass  # then the peak includes the imports' (the check only gets stricter)
    before = status("VmRSS")
    teacher = load_teacher(spec, arch=arch, precision="bf16")
    weights = 0
    for tensor in teacher.module.state_dict().values():
        float(tensor.sum())  # touch every page, as the first batch would (no float32 copy: sum accumulates)
        weights += tensor.numel() * tensor.element_size()
    print(json.dumps({"peak": status("VmHWM") - before, "weights": weights,
                      "dtypes": sorted({str(t.dtype) for t in teacher.module.parameters()})}))
""")


def _peak(spec_: str, warm: str, arch: str = "") -> dict:
    """Load ``spec_`` in a fresh process after ``warm`` (the same architecture, tiny): peak resident growth and weight bytes."""
    warm_arch = arch.replace(":big", ":small")
    done = subprocess.run([sys.executable, "-c", _MEASURE, spec_, arch, warm, warm_arch], capture_output=True, text=True, timeout=300,
                          cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from /proc (Linux)")
def test_loading_peaks_at_the_weights_size_in_bf16(tmp_path: Path) -> None:
    """~45 MB of bf16 weights: an hf: directory saved in bf16, and state dicts saved in bf16 and in float32
    (the float32 file is memory-mapped and its pages dropped as each tensor is cast)."""
    torch.manual_seed(0)
    big, small = tiny_llama(vocab=16000, hidden=512, layers=2), tiny_llama(vocab=64, hidden=16, layers=1)
    for name, model in (("big", big), ("small", small)):
        model.to(torch.bfloat16).save_pretrained(tmp_path / name)
        torch.save(model.state_dict(), tmp_path / f"{name}-bf16.pt")
        torch.save(model.float().state_dict(), tmp_path / f"{name}-fp32.pt")
    (tmp_path / "arch.py").write_text(textwrap.dedent("""
        import transformers
        def llama(vocab, hidden, layers):
            return transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=1,
                pad_token_id=0, tie_word_embeddings=False))
        def big():
            return llama(16000, 512, 2)
        def small():
            return llama(64, 16, 1)
    """))
    arch = str(tmp_path / "arch.py")
    cases = {
        "hf bf16": _peak(f"hf:{tmp_path / 'big'}", f"hf:{tmp_path / 'small'}"),
        "state dict bf16": _peak(str(tmp_path / "big-bf16.pt"), str(tmp_path / "small-bf16.pt"), f"{arch}:big"),
        "state dict fp32": _peak(str(tmp_path / "big-fp32.pt"), str(tmp_path / "small-fp32.pt"), f"{arch}:big"),
    }
    for case, measured in cases.items():
        assert measured["dtypes"] == ["torch.bfloat16"], case
        assert 40e6 < measured["weights"] < 50e6, case
        # a float32 copy anywhere would add 2x the weights; 1.2x leaves room for allocator slack only
        assert measured["peak"] <= 1.2 * measured["weights"], (case, cases)
