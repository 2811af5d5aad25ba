"""``--dataset hf:PATH``: Hugging Face ``datasets`` directories and data files as dump and training data.

Everything is built here, offline: datasets with ``Dataset.from_dict`` + ``save_to_disk`` (Python and torch
formats, a DatasetDict), .jsonl files, a word-level tokenizer trained on nothing (its vocabulary written out)
and saved with ``save_pretrained``, a tiny random GPT-2 teacher. Cached rows are compared with the teacher run
alone on inputs computed independently (the tokenizer's raw ``tokenizers`` object, the windows cut by hand).
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers
from conftest import ARCH, ARCH_KWARGS, make_teacher
from tokenizers import Tokenizer, models, pre_tokenizers

from logit_cache import DumpConfig, dump, open_cache
from logit_cache.data.datasets import resolve_dataset
from logit_cache.format.identity import dataset_fingerprint, sample_indices

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "big", "red", "house", "it", "was", "warm", "user",
         "assistant", ":", "hello", "how", "are", "you"]
VOCAB = 40  # the teacher's vocabulary: the tokenizer's ids (2 + len(WORDS)) fit in it
TEXTS = ["the cat sat on a mat", "a dog ran to the big red house", "it was warm", "the red cat ran", "how are you"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
LM = "logit_cache.models:tiny_lm"
LM_KWARGS = json.dumps({"vocab_size": VOCAB, "d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 64})


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No network (any socket connection fails loudly); datasets' own cache in a temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets-cache")
    datasets.disable_progress_bars()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def raw_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


EOS = 1


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok") / "tokenizer"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer(), unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    """A tiny random GPT-2 with the tokenizer's files next to it (as a model repository has them)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("lm") / "teacher"
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    for file in tok_dir.iterdir():
        shutil.copy(file, directory / file.name)
    return directory


def teacher_logits(teacher_dir: Path, sequences: list[torch.Tensor]) -> torch.Tensor:
    """The teacher run alone on each sequence, its rows concatenated."""
    model = transformers.GPT2LMHeadModel.from_pretrained(teacher_dir, local_files_only=True).eval()
    with torch.no_grad():
        return torch.cat([model(ids.long()[None]).logits[0] for ids in sequences])


def token_rows(n: int = 40, seed: int = 0) -> dict[str, list]:
    """Ragged rows of ids with right padding (zeros in the mask) on every third row, as Python lists."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for i in range(n):
        length = int(rng.integers(3, 12))
        pad = 2 if i % 3 == 0 else 0
        ids.append(rng.integers(2, VOCAB, size=length + pad).tolist())
        masks.append([1] * length + [0] * pad)
    return {"input_ids": ids, "attention_mask": masks, "name": [f"row{i}" for i in range(n)]}


def python_token_rows(n: int = 40) -> datasets.Dataset:
    """What the issue reported: a datasets.Dataset in its default (Python list) format from a MODULE:CALLABLE."""
    return datasets.Dataset.from_dict(token_rows(n))


def save(data: datasets.Dataset | datasets.DatasetDict, path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    data.save_to_disk(str(path))
    return path


def assert_topk_rows_match_the_teacher(cache_dir: Path, teacher_dir: Path, sequences: list[torch.Tensor], k: int) -> None:
    reader = open_cache(cache_dir)
    expected = teacher_logits(teacher_dir, sequences)
    assert reader.num_rows == len(expected)
    top = torch.topk(expected, k, dim=-1)
    np.testing.assert_allclose(reader.read("topk_logits"), top.values.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(reader.read("topk_indices"), top.indices.numpy())


def real_tokens(rows: dict[str, list]) -> list[torch.Tensor]:
    return [torch.tensor(ids[: sum(mask)]) for ids, mask in zip(rows["input_ids"], rows["attention_mask"], strict=True)]


def test_python_and_torch_format_rows_become_the_same_tensors(tmp_path: Path) -> None:
    rows = token_rows(6)
    python = save(datasets.Dataset.from_dict(rows), tmp_path / "py")
    torch_format = save(datasets.Dataset.from_dict(rows).with_format("torch"), tmp_path / "pt")
    for path in (python, torch_format):
        resolved = resolve_dataset(f"hf:{path}")
        assert resolved.per_token
        for i in range(6):
            item = resolved.dataset[i]
            assert set(item) == {"input_ids", "attention_mask"}  # the string column is not part of a token item
            assert item["input_ids"].dtype == torch.int64 and item["input_ids"].tolist() == rows["input_ids"][i]
            assert item["attention_mask"].tolist() == rows["attention_mask"][i]
        # the identity names the data by datasets' own fingerprint, not by the path
        assert resolved.identity["kwargs"]["source"] == f"datasets:{datasets.load_from_disk(str(path))._fingerprint}"
        copy = shutil.copytree(path, tmp_path / f"copy-{path.name}")
        assert resolve_dataset(f"hf:{copy}").fingerprint() == resolved.fingerprint()


def test_a_python_format_dataset_from_a_callable_dumps(tmp_path: Path, teacher_dir: Path) -> None:
    """The issue's `AttributeError: 'list' object has no attribute 'size'`: lists become tensors where the dataset is adapted."""
    out = tmp_path / "cache"
    dump(DumpConfig(teacher=f"hf:{teacher_dir}", dataset=f"{__file__}:python_token_rows", dataset_kwargs={"n": 12}, out=str(out),
                    mode="topk", k=5, dtype="float32", batch_size=4, quiet=True))
    assert_topk_rows_match_the_teacher(out, teacher_dir, real_tokens(token_rows(12)), 5)


def test_dump_and_train_from_a_saved_dataset_and_refuse_it_changed(tmp_path: Path, teacher_dir: Path, cli) -> None:
    rows = token_rows(40)
    path = save(datasets.Dataset.from_dict(rows), tmp_path / "rows")
    out = tmp_path / "cache"
    result = cli("dump", "--teacher", f"hf:{teacher_dir}", "--dataset", f"hf:{path}", "--topk", "5", "--dtype", "float32",
                 "--out", out, "--batch-size", "8", "-q")
    assert result.exit_code == 0, result.output
    assert_topk_rows_match_the_teacher(out, teacher_dir, real_tokens(rows), 5)
    train = ["train", "--student", LM, "--student-kwargs", LM_KWARGS, "--dataset", f"hf:{path}", "--cache", out, "--epochs", "1",
             "--batch-size", "8", "-q"]
    result = cli(*train, "--out", tmp_path / "s.pt")
    assert result.exit_code == 0, result.output
    assert np.isfinite(json.loads((tmp_path / "s.metrics.json").read_text())["epochs"][-1]["train_loss"])

    # change a row the fingerprint does not sample (same length), re-save: the sampled items still agree ...
    changed = 1
    assert changed not in sample_indices(40)
    rows["input_ids"][changed] = [(t + 1) % VOCAB or 2 for t in rows["input_ids"][changed]]
    save(datasets.Dataset.from_dict(rows), path)
    manifest = open_cache(out).manifest
    identity = manifest.dataset["identity"]
    same_items = dataset_fingerprint(resolve_dataset(f"hf:{path}").dataset, identity["spec"], identity["kwargs"])
    assert same_items == manifest.dataset["fingerprint"]
    # ... but datasets' fingerprint does not, and training refuses the pairing
    result = cli(*train, "--out", tmp_path / "s2.pt")
    assert result.exit_code == 1
    assert "differs from what the cache was dumped from" in result.output


def test_a_dataset_dict_needs_a_split(tmp_path: Path, teacher_dir: Path, cli) -> None:
    rows = token_rows(20)
    whole = datasets.Dataset.from_dict(rows)
    path = save(datasets.DatasetDict({"train": whole.select(range(14)), "test": whole.select(range(14, 20))}), tmp_path / "dd")
    base = ["dump", "--teacher", f"hf:{teacher_dir}", "--dataset", f"hf:{path}", "--topk", "3", "--dtype", "float32", "-q"]
    result = cli(*base, "--out", tmp_path / "none")
    assert result.exit_code == 1
    assert "is a DatasetDict with splits train, test" in result.output and '{"split": "train"}' in result.output
    result = cli(*base, "--dataset-kwargs", '{"split": "test"}', "--out", tmp_path / "test")
    assert result.exit_code == 0, result.output
    manifest = open_cache(tmp_path / "test").manifest
    assert manifest.num_samples == 6 and manifest.dataset["kwargs"] == {"split": "test"}
    assert_topk_rows_match_the_teacher(tmp_path / "test", teacher_dir, real_tokens({k: v[14:] for k, v in rows.items()}), 3)


def windows(texts: list[str], seq_len: int) -> list[list[int]]:
    """The documented windowing, by hand: each text's ids, then EOS; concatenated; cut every seq_len (last >= 2)."""
    raw = raw_tokenizer()
    stream = [t for text in texts for t in [*raw.encode(text).ids, EOS]]
    return [stream[s : s + seq_len] for s in range(0, len(stream), seq_len) if len(stream[s : s + seq_len]) >= 2]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_text_column_is_tokenised_dumped_and_trained_from(tmp_path: Path, teacher_dir: Path, tok_dir: Path, cli) -> None:
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    out = tmp_path / "cache"
    result = cli("dump", "--teacher", f"hf:{teacher_dir}", "--dataset", f"hf:{data}", "--text-column", "text", "--seq-len", "6",
                 "--topk", "4", "--dtype", "float32", "--out", out, "--batch-size", "4", "-q")
    assert result.exit_code == 0, result.output
    expected = windows(TEXTS, 6)
    manifest = open_cache(out).manifest
    # the flags became dataset kwargs; the tokenizer defaulted to the hf:DIR teacher's directory
    assert manifest.dataset["kwargs"] == {"text_column": "text", "seq_len": 6, "tokenizer": str(teacher_dir)}
    assert manifest.num_samples == len(expected)
    assert_topk_rows_match_the_teacher(out, teacher_dir, [torch.tensor(w) for w in expected], 4)

    # training names the tokenizer elsewhere (the same files): one identity, the cache is accepted
    train = ["train", "--student", LM, "--student-kwargs", LM_KWARGS, "--dataset", f"hf:{data}", "--text-column", "text",
             "--tokenizer", tok_dir, "--cache", out, "--epochs", "1", "--batch-size", "4", "-q"]
    # (the text flags reach an hf: --eval-dataset too)
    result = cli(*train, "--seq-len", "6", "--eval-dataset", f"hf:{data}", "--out", tmp_path / "s.pt")
    assert result.exit_code == 0, result.output
    assert np.isfinite(json.loads((tmp_path / "s.metrics.json").read_text())["epochs"][-1]["eval_perplexity"])
    # other windows, or other texts: refused
    result = cli(*train, "--seq-len", "5", "--out", tmp_path / "s2.pt")
    assert result.exit_code == 1 and "items but the cache holds" in result.output
    write_jsonl(data, [{"text": t.replace("cat", "dog"), "id": i} for i, t in enumerate(TEXTS)])
    result = cli(*train, "--seq-len", "6", "--out", tmp_path / "s3.pt")
    assert result.exit_code == 1 and "differs from what the cache was dumped from" in result.output


def test_a_folder_of_data_files_and_a_messages_column_with_the_chat_template(tmp_path: Path, tok_dir: Path) -> None:
    folder = tmp_path / "chats"
    folder.mkdir()
    chats = [[{"role": "user", "content": "hello how are you"}, {"role": "assistant", "content": "it was warm"}],
             [{"role": "user", "content": "the cat sat"}], [{"role": "user", "content": "a big red house"}]]
    write_jsonl(folder / "b.jsonl", [{"messages": chats[2]}])
    write_jsonl(folder / "a.jsonl", [{"messages": c} for c in chats[:2]])  # read in sorted order: a, then b
    resolved = resolve_dataset(f"hf:{folder}", {"text_column": "messages", "seq_len": 7, "tokenizer": str(tok_dir)})
    rendered = ["".join(f"{m['role']} : {m['content']} <eos> " for m in chat) for chat in chats]
    assert [resolved.dataset[i].tolist() for i in range(len(resolved))] == windows(rendered, 7)
    assert resolved.per_token


def test_per_sample_rows_dump_and_train(tmp_path: Path, teacher_ckpt: Path, cli) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(30, 64, generator=generator)
    labels = torch.randint(0, 10, (30,), generator=generator)
    path = save(datasets.Dataset.from_dict({"x": x.tolist(), "label": labels.tolist()}), tmp_path / "flat")
    resolved = resolve_dataset(f"hf:{path}")
    assert resolved.has_labels and not resolved.per_token
    item = resolved.dataset[3]
    assert item[1] == int(labels[3]) and item[0].dtype == torch.float32
    torch.testing.assert_close(item[0], x[3])
    out = tmp_path / "cache"
    result = cli("dump", "--teacher", teacher_ckpt, "--arch", ARCH, "--arch-kwargs", ARCH_KWARGS, "--dataset", f"hf:{path}",
                 "--full", "--dtype", "float32", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        expected = make_teacher()(x)
    np.testing.assert_allclose(open_cache(out).read("logits"), expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(open_cache(out).read("labels"), labels.numpy())
    result = cli("train", "--student", ARCH, "--student-kwargs", '{"hidden": 8}', "--dataset", f"hf:{path}", "--cache", out,
                 "--epochs", "1", "--out", tmp_path / "s.pt", "-q")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "hf:{jsonl}", "--text-column", "text"], "needs a tokenizer: --tokenizer DIR"),
    (["--dataset", "digits", "--text-column", "text"], "--text-column tokenise a text column of --dataset hf:PATH"),
    (["--dataset", "hf:{jsonl}"], "column 'text' holds text, not numbers a model takes: tokenise a text column with --text-column text"),
    (["--dataset", "hf:{jsonl}", "--dataset-kwargs", '{"splitt": "x"}'], "unknown dataset kwargs splitt; hf:PATH takes split"),
    (["--dataset", "hf:{missing}"], "no such file or directory"),
    (["--dataset", "hf:{jsonl}", "--text-column", "text", "--tokenizer", "{tmp}", "--dataset-kwargs", '{"text_column": "t"}'],
     "--text-column 'text' contradicts --dataset-kwargs text_column='t'"),
])
def test_errors_name_the_fix(tmp_path: Path, teacher_ckpt: Path, cli, args: list[str], message: str) -> None:
    jsonl = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    filled = [a.replace("{jsonl}", str(jsonl)).replace("{missing}", str(tmp_path / "nope")).replace("{tmp}", str(tmp_path))
              for a in args]
    result = cli("dump", "--teacher", teacher_ckpt, "--arch", ARCH, "--arch-kwargs", ARCH_KWARGS, *filled, "--topk", "3",
                 "--out", tmp_path / "c", "-q")
    assert result.exit_code == 1
    assert message in result.output, result.output
