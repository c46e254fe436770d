"""A GGUF file's quantized blocks carried into the int4 ONNX build as they are: each format's
exact form, llama.cpp's q/k row order undone, and SmolLM2's real file imported end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llm_packager.choices import ExecutionProvider, OnnxPrecision
from llm_packager.models.gguf_blocks import (
    SUMMARY_FILE,
    Blocks,
    UnsupportedBlocksError,
    blocks_of,
    gguf_dequantized,
    gguf_weights,
    import_gguf_blocks,
    unpermute_rows,
)


def _gguf_tensors(path: Path, kinds: list[str]) -> dict[str, object]:
    """A GGUF file with one random 16x96 tensor per block format, quantized by gguf's own
    quantizer, read back."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(7)
    writer = GGUFWriter(str(path), "llama")
    for kind in kinds:
        values = rng.standard_normal((16, 96)).astype(np.float32) + rng.uniform(-1, 1)
        quantized = quantize(values, GGMLQuantizationType[kind])
        writer.add_tensor(kind, quantized, raw_dtype=GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {tensor.name: tensor for tensor in GGUFReader(path).tensors}


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_each_format_computes_the_weights_ggufs_own_dequantizer_gives(kind, tmp_path):
    tensor = _gguf_tensors(tmp_path / "blocks.gguf", [kind])[kind]
    blocks = blocks_of(tensor)
    expected = gguf_dequantized(tensor)
    got = blocks.dequantized()
    assert blocks.bits == (8 if kind == "Q8_0" else 4)
    assert (blocks.correction is not None) == (kind == "Q4_1")
    # Q4_0 and Q8_0 are the kernel's own formula: equal to the bit. Q4_1 is d*(q-8) + (8d+m)
    # where gguf computes d*q + m: the same real number, rounded to float32 in another order, so
    # a few units in the last place of the largest weight.
    tolerance = 0.0 if kind != "Q4_1" else 4 * float(np.spacing(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


def test_a_format_without_an_exact_form_is_refused_with_the_setting_that_requantizes(tmp_path):
    tensor = _gguf_tensors(tmp_path / "q5.gguf", ["Q5_0"])["Q5_0"]
    with pytest.raises(UnsupportedBlocksError, match=r"Q5_0.*onnx\.gguf_blocks=requantize"):
        blocks_of(tensor)


def test_rows_come_back_in_hugging_faces_order_after_llama_cpps_permute():
    heads, head_size, blocks_per_row = 3, 8, 2
    rows = heads * head_size
    labels = np.arange(rows, dtype=np.float32)
    original = Blocks(
        codes=np.repeat(labels.astype(np.uint8)[:, None, None], blocks_per_row * 16).reshape(
            rows, blocks_per_row, 16),
        scales=np.repeat(labels[:, None], blocks_per_row, axis=1),
        bits=4,
        correction=np.repeat(labels[:, None], blocks_per_row, axis=1) + 100,
    )  # fmt: skip

    def llama_cpp_permute(array: np.ndarray) -> np.ndarray:
        # convert_hf_to_gguf.py's LlamaModel.permute, written out here.
        return (array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:])
                .swapaxes(1, 2).reshape(array.shape))  # fmt: skip

    permuted = Blocks(llama_cpp_permute(original.codes), llama_cpp_permute(original.scales), 4,
                      llama_cpp_permute(original.correction))  # fmt: skip
    assert not np.array_equal(permuted.scales, original.scales)
    restored = unpermute_rows(permuted, heads)
    for part in ("codes", "scales", "correction"):
        np.testing.assert_array_equal(getattr(restored, part), getattr(original, part))


@pytest.mark.slow
def test_every_smollm2_weight_is_the_one_transformers_dequantized(smollm2_gguf, smollm2_hf):
    """Each imported projection (q and k with their rows put back), read as the kernel reads it,
    equals the float32 weight of the transformers reference converted from the same file."""
    from safetensors.numpy import load_file

    reference = load_file(smollm2_hf / "model.safetensors")
    config = json.loads((smollm2_hf / "config.json").read_text())
    shape = [config[key] for key in
             ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")]  # fmt: skip
    weights = gguf_weights(smollm2_gguf, *shape)
    names = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
             "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
             "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
             "mlp.down_proj": "mlp.down_proj"}  # fmt: skip
    compared = 0
    for layer in range(config["num_hidden_layers"]):
        for ours, theirs in names.items():
            expected = reference[f"model.layers.{layer}.{theirs}.weight"]
            got = weights[f"model.layers.{layer}.{ours}"].dequantized()
            # transformers dequantizes Q4_1 as d*q + m; see the tolerance above.
            tolerance = 4 * float(np.spacing(np.abs(expected).max()))
            np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance,
                                       err_msg=f"layer {layer} {ours}")  # fmt: skip
            compared += 1
    # Tied: the head is the embedding, stored once as Q8_0.
    np.testing.assert_array_equal(weights["lm_head"].dequantized(),
                                  reference["model.embed_tokens.weight"])  # fmt: skip
    assert compared == 7 * config["num_hidden_layers"]


def _accuracy_levels(folder: Path) -> dict[str, int]:
    """Each MatMulNBits node's accuracy_level in the build in ``folder``, by its weight's name."""
    import onnx
    from onnx import helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {
        node.input[1].split(".MatMul.")[0]: next(
            helper.get_attribute_value(a) for a in node.attribute if a.name == "accuracy_level"
        )
        for node in model.graph.node
        if node.op_type == "MatMulNBits"
    }


def _float_activations_everywhere(folder: Path) -> None:
    """Every MatMulNBits of the build at accuracy level 0, the 8-bit head too (the import keeps
    that one on int8 activations for speed): with no activation rounding left, what remains of a
    difference is the weights'."""
    import onnx
    from onnx import helper

    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for index, attribute in enumerate(node.attribute):
                if attribute.name == "accuracy_level":
                    node.attribute[index].CopyFrom(helper.make_attribute("accuracy_level", 0))
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def smollm2_int4_exact(smollm2_hf, tmp_path_factory) -> Path:
    """SmolLM2's builder int4 build with float activations (accuracy level 0), before import."""
    from llm_packager.models.onnx_build import build_onnx_model

    folder = tmp_path_factory.mktemp("smollm2-int4")
    return build_onnx_model(
        smollm2_hf, folder / "int4", precision=OnnxPrecision.int4,
        execution_provider=ExecutionProvider.cpu,
        extra_options={"accuracy_level": "0", "block_size": "32"}, log_path=folder / "log",
    )  # fmt: skip


@pytest.mark.slow
def test_the_imported_build_computes_smollm2s_own_weights(
    smollm2_gguf, smollm2_hf, smollm2_int4_exact, tmp_path
):
    """With float activations the imported int4 model gives the transformers reference's
    distributions (teacher-forced KL ~ 0), where the builder's re-quantization does not; and it
    keeps under 0.40 of the float32 weights' bytes."""
    from llm_packager.evaluation.teacher_forcing import (
        compare,
        next_token_log_probs,
        onnx_logits,
        tokenize_corpus,
        torch_logits,
    )
    from llm_packager.keys import KLD_MEAN_METRIC, TOP1_AGREEMENT_METRIC
    from llm_packager.project import PROJECT_DIR

    imported = tmp_path / "imported"
    shutil.copytree(smollm2_int4_exact, imported)
    summary = import_gguf_blocks(imported, smollm2_gguf, "sha")
    assert json.loads((imported / SUMMARY_FILE).read_text())["matmuls"] == {
        "4-bit": 150,
        "8-bit": 1,
    }
    assert summary.correction_nodes > 0
    # The 4-bit projections on float activations, the Q8_0 head on int8 ones (the default).
    levels = _accuracy_levels(imported)
    assert levels.pop("lm_head") == 4 and set(levels.values()) == {0}, levels
    _float_activations_everywhere(imported)
    texts = [(PROJECT_DIR / "data" / "heldout_text.txt").read_text()[:1500]]
    chunks = tokenize_corpus(smollm2_hf, texts)
    reference = np.concatenate(list(next_token_log_probs(torch_logits(smollm2_hf), chunks, 1)))

    def figures(folder: Path) -> dict[str, float]:
        candidate = next_token_log_probs(onnx_logits(folder), chunks, 1)
        return compare(reference, candidate, chunks).figures()

    exact, requantized = figures(imported), figures(smollm2_int4_exact)
    assert exact[KLD_MEAN_METRIC] < 1e-5 and exact[TOP1_AGREEMENT_METRIC] == 1.0, exact
    assert requantized[KLD_MEAN_METRIC] > 100 * exact[KLD_MEAN_METRIC], requantized
    fp32_bytes = (smollm2_hf / "model.safetensors").stat().st_size
    onnx_bytes = sum(path.stat().st_size for path in imported.iterdir())
    assert onnx_bytes <= 0.40 * fp32_bytes


def _tiny_llama_gguf(folder: Path, embedding_kind: str) -> tuple[Path, Path]:
    """A tiny random llama in Hugging Face layout whose weights are exactly what a GGUF file of
    it holds (Q4_1 projections, the tied embedding in ``embedding_kind``), and that file, written
    as llama.cpp's converter writes one: q and k rows permuted per head."""
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_packager.sources.synthetic import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(512)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=3, pad_token_id=3)  # fmt: skip
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    writer = GGUFWriter(str(folder / "tiny.gguf"), "llama")

    def put(name: str, weight: torch.Tensor, kind: str, heads: int = 0) -> torch.Tensor:
        values = weight.detach().float().numpy()
        quantized = quantize(values, GGMLQuantizationType[kind])
        stored = quantized
        if heads:  # rows permuted as convert_hf_to_gguf.py's LlamaModel.permute does
            stored = (quantized.reshape(heads, 2, quantized.shape[0] // heads // 2, -1)
                      .swapaxes(1, 2).reshape(quantized.shape))  # fmt: skip
        writer.add_tensor(name, np.ascontiguousarray(stored), raw_dtype=GGMLQuantizationType[kind])
        return torch.from_numpy(dequantize(quantized, GGMLQuantizationType[kind]).copy())

    names = {"self_attn.q_proj": ("attn_q", 4), "self_attn.k_proj": ("attn_k", 2),
             "self_attn.v_proj": ("attn_v", 0), "self_attn.o_proj": ("attn_output", 0),
             "mlp.gate_proj": ("ffn_gate", 0), "mlp.up_proj": ("ffn_up", 0),
             "mlp.down_proj": ("ffn_down", 0)}  # fmt: skip
    exact = {"model.embed_tokens.weight": put(
        "token_embd.weight", state["model.embed_tokens.weight"], embedding_kind)}  # fmt: skip
    for layer in range(config.num_hidden_layers):
        for theirs, (ours, heads) in names.items():
            key = f"model.layers.{layer}.{theirs}.weight"
            exact[key] = put(f"blk.{layer}.{ours}.weight", state[key], "Q4_1", heads)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.load_state_dict(exact, strict=False)
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    return folder / "hf", folder / "tiny.gguf"


@pytest.mark.slow
def test_a_tiny_llama_built_from_its_gguf_blocks_computes_the_files_weights(tmp_path):
    """onnxruntime's own kernels on the imported graph give the logits of the model whose weights
    are the file's: Q4_1 corrections, q/k rows put back, the tied embedding gathering the Q8_0
    head; and a tied Q4_1 embedding, which no gather can carry exactly, is refused and leaves the
    build as the builder made it."""
    from llm_packager.evaluation.teacher_forcing import onnx_logits, torch_logits
    from llm_packager.models.onnx_build import build_onnx_model

    hf, gguf = _tiny_llama_gguf(tmp_path, "Q8_0")
    # Built as the pipeline builds int4 (int8 activations), so the import's levels are its own.
    build = build_onnx_model(
        hf, tmp_path / "int4", precision=OnnxPrecision.int4,
        execution_provider=ExecutionProvider.cpu,
        extra_options={"accuracy_level": "4", "block_size": "32"}, log_path=tmp_path / "log",
    )  # fmt: skip
    rows = [[5, 17, 300, 42, 9, 250, 77], [8, 100, 3, 64]]
    expected = torch_logits(hf)(rows)
    before = onnx_logits(build)(rows)
    fast = tmp_path / "fast"
    shutil.copytree(build, fast)
    summary = import_gguf_blocks(build, gguf)
    # By default the 4-bit projections take float activations, the 8-bit head int8 ones;
    # int8_activations (onnx.gguf_blocks=fast) puts every matmul on int8 activations.
    levels = _accuracy_levels(build)
    assert summary.accuracy_levels == levels
    assert levels.pop("lm_head") == 4 and set(levels.values()) == {0}, levels
    import_gguf_blocks(fast, gguf, int8_activations=True)
    assert set(_accuracy_levels(fast).values()) == {4}
    # The graphs as they ship run on onnxruntime, nearer the file's model than the builder's.
    for shipped in (onnx_logits(build)(rows), onnx_logits(fast)(rows)):
        for want, old, new in zip(expected, before, shipped, strict=True):
            assert np.abs(new - want).max() < np.abs(old - want).max()
    _float_activations_everywhere(build)
    after = onnx_logits(build)(rows)
    assert summary.kept == [] and summary.correction_nodes > 0
    for want, old, new in zip(expected, before, after, strict=True):
        np.testing.assert_allclose(new, want, rtol=0, atol=1e-4)
        assert np.abs(old - want).max() > 100 * np.abs(new - want).max()

    q4_1_embedding, q4_1_gguf = _tiny_llama_gguf(tmp_path / "q4_1", "Q4_1")
    built = build_onnx_model(
        q4_1_embedding, tmp_path / "q4_1" / "int4", precision=OnnxPrecision.int4,
        execution_provider=ExecutionProvider.cpu, extra_options={"block_size": "32"},
        log_path=tmp_path / "q4_1" / "log",
    )  # fmt: skip
    unchanged = {path.name: path.read_bytes() for path in built.iterdir()}
    with pytest.raises(UnsupportedBlocksError, match="tied embedding and head are Q4_1"):
        import_gguf_blocks(built, q4_1_gguf)
    assert {path.name: path.read_bytes() for path in built.iterdir()} == unchanged
