"""A GGUF file's quantized blocks carried into an int4 ONNX build as they are, instead of the
builder re-quantizing weights that were dequantized from them.

A GGUF that ships quantized (SmolLM2's is Q4_1) reaches the model builder as float32 weights,
and an int4 build then rounds them again in another scheme: two quantization errors, where the
file had one. Here the builder's int4 graph keeps its shape and its nodes, and each projection's
weights are replaced by the file's own blocks, in a form onnxruntime's fast CPU kernels run:

- **Q4_0** (``d·(q-8)``): 4-bit ``MatMulNBits`` without zero points, which is the same formula.
- **Q8_0** (``d·q``, q signed): 8-bit ``MatMulNBits`` (and 8-bit ``GatherBlockQuantized`` for a
  tied embedding), the codes shifted by 128, the kernel's default zero point.
- **Q4_1** (``d·q + m``): the symmetric part ``d·(q-8)`` in 4-bit ``MatMulNBits``, plus the
  block's constant ``8·d + m`` times the sum of the activations over that block: the block sums
  are one matmul with a 0/1 (K, K/32) matrix, shared by the matmuls reading the same
  activations, then a matmul over K/32 rows and an add per projection. Float zero points
  would carry ``m`` directly but run 24-60x slower on onnxruntime 1.31's CPU kernel.

The activations: ``MatMulNBits`` can quantize them to int8 per block (accuracy level 4) or keep
them float (level 0). With int8 activations the imported SmolLM2 stays KL 0.0035 from its float32
reference, which costs answers (21 of 48 contain the reference against its 23); with float
activations in the 4-bit matmuls it is 0.0008 (24 of 48) and decodes a third slower (38 against
58 tokens/s at batch 1, ``benchmarks/peers.py``). So by default the 4-bit matmuls take float
activations and the 8-bit ones (a Q8_0 head) int8: onnxruntime 1.31 has no fast float path for
8 bits (with the head on float activations too the model is exact, KL 1.4e-8, but decodes at 3.5
tokens/s). The levels are set whatever ``accuracy_level`` the build was given.
``int8_activations`` puts every matmul at level 4 (``onnx.gguf_blocks=fast``).

Other block formats (K-quants, Q5, float) are refused with ``UnsupportedBlocksError``; the
logging step then re-quantizes, as before (``onnx.gguf_blocks``).

The file's tensors follow llama.cpp's names and its converter's row order for q and k
(``permute`` in llama.cpp's convert_hf_to_gguf.py interleaves each head's two rotary halves);
the rows are put back in Hugging Face's order before they replace the builder's, and q, k and v
go into the builder's packed ``qkv_proj`` where it made one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llm_packager.errors import UserError

BLOCK = 32
# Bytes per block of 32 weights: a float16 scale, a float16 minimum for Q4_1, then the codes.
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
SUMMARY_FILE = "gguf_blocks.json"
# MatMulNBits' accuracy_level: 0 keeps the activations float; 4 quantizes them to int8 per block.
FLOAT_ACTIVATIONS, INT8_ACTIVATIONS = 0, 4
_PROJECTIONS = {
    "attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
}


class UnsupportedBlocksError(UserError, ValueError):
    """The GGUF file or the ONNX build is not one whose blocks can be carried over exactly."""


@dataclass(frozen=True)
class Blocks:
    """One weight matrix as MatMulNBits takes it: ``codes`` (N, K/32, 16 or 32) uint8, ``scales``
    (N, K/32) float32, ``bits``, and for Q4_1 the per-block ``correction`` (N, K/32) float32."""

    codes: np.ndarray
    scales: np.ndarray
    bits: int
    correction: np.ndarray | None = None

    def dequantized(self) -> np.ndarray:
        """The (N, K) float32 weights this computes, as the kernel reads them."""
        if self.bits == 4:
            low, high = self.codes & 0x0F, self.codes >> 4
            values = np.stack((low, high), axis=-1).reshape(*self.codes.shape[:2], BLOCK)
            weights = (values.astype(np.float32) - 8) * self.scales[..., None]
        else:
            weights = (self.codes.astype(np.float32) - 128) * self.scales[..., None]
        if self.correction is not None:
            weights = weights + self.correction[..., None]
        return weights.reshape(self.codes.shape[0], -1)


@dataclass
class ImportSummary:
    """What was carried over: each projection's bit width, the nodes added for Q4_1, and what
    kept the builder's weights."""

    tensors: dict[str, int] = field(default_factory=dict)
    correction_nodes: int = 0
    gguf_sha256: str = ""
    # Quantized nodes that keep the builder's own weights (an untied embedding).
    kept: list[str] = field(default_factory=list)
    # Each imported projection's MatMulNBits accuracy level (FLOAT_ACTIVATIONS or INT8_ACTIVATIONS).
    accuracy_levels: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"tensors": self.tensors, "correction_nodes": self.correction_nodes,
                "gguf_sha256": self.gguf_sha256, "kept": self.kept,
                "accuracy_levels": self.accuracy_levels}  # fmt: skip


def blocks_of(tensor) -> Blocks:
    """A GGUF tensor (gguf's ReaderTensor) in MatMulNBits' layout.

    Raises:
        UnsupportedBlocksError: a type other than Q4_0, Q4_1 or Q8_0.
    """
    kind = tensor.tensor_type.name
    if kind not in _BLOCK_BYTES:
        raise UnsupportedBlocksError(
            f"{tensor.name} is {kind}; only Q4_0, Q4_1 and Q8_0 blocks are carried over exactly "
            "(set onnx.gguf_blocks=requantize to re-quantize the dequantized weights)"
        )
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, _BLOCK_BYTES[kind])
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        signed = blocks[..., 2:].copy().view(np.int8)
        return Blocks((signed.astype(np.int16) + 128).astype(np.uint8), scales, 8)
    start = 4 if kind == "Q4_1" else 2
    packed = blocks[..., start:]
    # GGUF keeps weight j in the low half of byte j and weight j+16 in its high half;
    # MatMulNBits keeps weights 2j and 2j+1 in byte j (low, high).
    values = np.concatenate((packed & 0x0F, packed >> 4), axis=-1)
    codes = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
    correction = None
    if kind == "Q4_1":
        minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        correction = np.float32(8) * scales + minimum
    return Blocks(codes, scales, 4, correction)


def gguf_dequantized(tensor) -> np.ndarray:
    """The tensor's (N, K) float32 weights as gguf's own reference dequantizer gives them."""
    from gguf.quants import dequantize

    return dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)


def unpermute_rows(blocks: Blocks, heads: int) -> Blocks:
    """Rows back in Hugging Face's order, undoing llama.cpp's converter's q/k ``permute``: it
    turned each head's rows (two halves of head_size/2) into interleaved pairs."""
    rows = blocks.codes.shape[0]
    order = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)

    def put_back(array: np.ndarray | None) -> np.ndarray | None:
        if array is None:
            return None
        restored = np.empty_like(array)
        restored[order] = array
        return restored

    return Blocks(put_back(blocks.codes), put_back(blocks.scales), blocks.bits,
                  put_back(blocks.correction))  # fmt: skip


def _stacked(parts: list[Blocks]) -> Blocks:
    if len({part.bits for part in parts}) > 1:
        raise UnsupportedBlocksError("q, k and v are stored in different block formats")
    corrections = [part.correction for part in parts]
    correction = None
    if any(c is not None for c in corrections):
        correction = np.concatenate([
            c if c is not None else np.zeros_like(part.scales)
            for c, part in zip(corrections, parts, strict=True)
        ])  # fmt: skip
    return Blocks(np.concatenate([p.codes for p in parts]),
                  np.concatenate([p.scales for p in parts]), parts[0].bits, correction)  # fmt: skip


def gguf_weights(gguf_path: Path, layers: int, heads: int, kv_heads: int) -> dict[str, Blocks]:
    """Every projection's blocks under the builder's MatMul names (``model.layers.3.attn.
    qkv_proj``, ``lm_head``), from a llama-architecture GGUF file.

    Raises:
        UnsupportedBlocksError: another architecture, a missing tensor, or a block format
            that cannot be carried over exactly.
    """
    from llm_packager.sources.gguf import gguf_metadata, open_gguf

    reader = open_gguf(gguf_path)
    architecture = gguf_metadata(reader)["architecture"] or "(none)"
    if architecture != "llama":
        raise UnsupportedBlocksError(
            f"{gguf_path.name} is a '{architecture}' model; blocks are carried over for llama "
            "GGUF files only (set onnx.gguf_blocks=requantize)"
        )
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    weights: dict[str, Blocks] = {}
    for layer in range(layers):
        for projection, short in _PROJECTIONS.items():
            name = f"blk.{layer}.{short}.weight"
            if name not in tensors:
                raise UnsupportedBlocksError(f"{gguf_path.name} has no tensor {name}")
            blocks = blocks_of(tensors[name])
            if short == "attn_q":
                blocks = unpermute_rows(blocks, heads)
            elif short == "attn_k":
                blocks = unpermute_rows(blocks, kv_heads)
            weights[f"model.layers.{layer}.{projection}"] = blocks
        weights[f"model.layers.{layer}.attn.qkv_proj"] = _stacked([
            weights[f"model.layers.{layer}.attn.{name}_proj"] for name in "qkv"
        ])  # fmt: skip
    head = tensors.get("output.weight", tensors.get("token_embd.weight"))
    if head is None:
        raise UnsupportedBlocksError(f"{gguf_path.name} has neither output nor token_embd")
    weights["lm_head"] = blocks_of(head)
    return weights


def _attribute(node, name: str):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _set_attribute(node, name: str, value) -> None:
    from onnx import helper

    for index, attribute in enumerate(node.attribute):
        if attribute.name == name:
            node.attribute[index].CopyFrom(helper.make_attribute(name, value))
            return
    node.attribute.append(helper.make_attribute(name, value))


def import_gguf_blocks(onnx_folder: Path, gguf_path: Path, gguf_sha256: str = "",
                       *, int8_activations: bool = False) -> ImportSummary:  # fmt: skip
    """Replace the int4 build's projection weights in ``onnx_folder`` by the GGUF's own blocks
    (see the module docstring), in place, and write ``gguf_blocks.json`` beside the model. The
    4-bit matmuls take float activations, or int8 ones with ``int8_activations``; the 8-bit ones
    always take int8.

    Raises:
        UnsupportedBlocksError: not an int4 MatMulNBits build of the same shapes, or a GGUF the
            blocks of which cannot be carried over exactly; the folder is then left unchanged
            (every check and edit happens in memory, before the model file is written).
    """
    import onnx

    genai = json.loads((onnx_folder / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    model_file = onnx_folder / decoder.get("filename", "model.onnx")
    try:
        weights = gguf_weights(gguf_path, int(decoder["num_hidden_layers"]),
                               int(decoder["num_attention_heads"]),
                               int(decoder["num_key_value_heads"]))  # fmt: skip
        model = onnx.load(str(model_file))
        summary = _carry_over(model.graph, weights, gguf_sha256, int8_activations)
    except UnsupportedBlocksError:
        raise
    except Exception as error:  # a graph or file this code does not know: the build stays as is
        raise UnsupportedBlocksError(
            f"the build's graph or the GGUF file is not one whose blocks this version carries "
            f"over ({type(error).__name__}: {error})"
        ) from error
    data_file = model_file.with_name(model_file.name + ".data")
    data_file.unlink(missing_ok=True)  # onnx appends to an existing external data file
    onnx.save(model, str(model_file), save_as_external_data=True,
              all_tensors_to_one_file=True, location=data_file.name)  # fmt: skip
    counts: dict[str, int] = {}
    for bits in summary.tensors.values():
        counts[f"{bits}-bit"] = counts.get(f"{bits}-bit", 0) + 1
    (onnx_folder / SUMMARY_FILE).write_text(
        json.dumps({**summary.as_dict(), "matmuls": counts}, indent=2) + "\n"
    )
    return summary


def _carry_over(graph, weights: dict[str, Blocks], gguf_sha256: str,
                int8_activations: bool) -> ImportSummary:  # fmt: skip
    """The graph edits of `import_gguf_blocks`, in memory."""
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    summary = ImportSummary(gguf_sha256=gguf_sha256)
    after: dict[int, list] = {}  # nodes to insert after the node at each index
    block_sums: dict[str, str] = {}
    indicators: dict[int, str] = {}
    replaced: dict[str, Blocks] = {}
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMulNBits":
            if node.op_type == "MatMul" and "lm_head" not in node.name:
                raise UnsupportedBlocksError(f"{node.name} is a float MatMul: not an int4 build")
            continue
        weight_name = node.input[1]
        key = weight_name.split(".MatMul.")[0]
        if key not in weights:
            raise UnsupportedBlocksError(f"the build's {weight_name} has no GGUF counterpart")
        if int(_attribute(node, "block_size")) != BLOCK:
            raise UnsupportedBlocksError(
                f"{node.name} uses block size {_attribute(node, 'block_size')}; GGUF blocks hold 32"
            )
        blocks = weights[key]
        n, k = int(_attribute(node, "N")), int(_attribute(node, "K"))
        if blocks.scales.shape != (n, k // BLOCK):
            raise UnsupportedBlocksError(
                f"{key}: the build's {n}x{k} matmul does not match the GGUF's "
                f"{blocks.scales.shape[0]}x{blocks.scales.shape[1] * BLOCK}"
            )
        initializers[weight_name].CopyFrom(numpy_helper.from_array(blocks.codes, weight_name))
        scales_name = node.input[2]
        initializers[scales_name].CopyFrom(numpy_helper.from_array(blocks.scales, scales_name))
        _set_attribute(node, "bits", blocks.bits)
        level = FLOAT_ACTIVATIONS if blocks.bits == 4 and not int8_activations else INT8_ACTIVATIONS
        _set_attribute(node, "accuracy_level", level)
        summary.accuracy_levels[key] = level
        del node.input[3:]  # the builder's zero points, if any: the kernel's defaults apply
        replaced[weight_name] = blocks
        summary.tensors[key] = blocks.bits
        if blocks.correction is None:
            continue
        inserted = after.setdefault(index, [])
        activations = node.input[0]
        if activations not in block_sums:
            # The sum of the activations over each block of 32, as one matmul with a 0/1
            # (K, K/32) matrix: whatever the activations' rank, and one node, not two.
            if k not in indicators:
                indicators[k] = f"/gguf_blocks/block_indicator_{k}"
                indicator = np.repeat(np.eye(k // BLOCK, dtype=np.float32), BLOCK, axis=0)
                graph.initializer.append(numpy_helper.from_array(indicator, indicators[k]))
            block_sums[activations] = f"/gguf_blocks/{len(block_sums)}/sums"
            inserted.append(helper.make_node(
                "MatMul", [activations, indicators[k]], [block_sums[activations]],
                name=f"/gguf_blocks/{len(block_sums)}/BlockSums"))  # fmt: skip
        correction = f"{weight_name}_gguf_correction"
        graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(blocks.correction.T), correction)
        )
        output, raw = node.output[0], f"{node.output[0]}/before_correction"
        node.output[0] = raw
        inserted += [
            helper.make_node("MatMul", [block_sums[activations], correction],
                             [f"{raw}/correction"], name=f"{node.name}/GgufCorrection"),
            helper.make_node("Add", [raw, f"{raw}/correction"], [output],
                             name=f"{node.name}/GgufCorrectionAdd"),
        ]  # fmt: skip
    for node in graph.node:  # a tied embedding reads the head's blocks
        if node.op_type == "GatherBlockQuantized":
            summary.kept += _retie_embedding(graph, node, replaced)
    # Each node's corrections right after it, so the graph stays in topological order.
    nodes = list(graph.node)
    del graph.node[:]
    for index, node in enumerate(nodes):
        graph.node.append(node)
        graph.node.extend(after.get(index, []))
    summary.correction_nodes = sum(len(inserted) for inserted in after.values())
    _drop_stale_shapes(graph)
    return summary


def _retie_embedding(graph, node, replaced: dict[str, Blocks]) -> list[str]:
    """The builder's tied embedding gathers rows of the head's int4 weights through a Reshape;
    point it at the head's new blocks, in their bit width. Returns the embedding's name where it
    keeps the builder's own re-quantized weights (an untied one)."""
    from onnx import numpy_helper

    producer = next((n for n in graph.node if n.output and n.output[0] == node.input[0]), None)
    source = producer.input[0] if producer is not None and producer.op_type == "Reshape" else ""
    if source not in replaced:
        if node.input[0] in replaced or source:
            raise UnsupportedBlocksError(f"{node.name} reads weights that were not carried over")
        return [node.name]
    blocks = replaced[source]
    if blocks.correction is not None:
        # A gather has no place for Q4_1's per-block correction.
        raise UnsupportedBlocksError(
            f"the tied embedding and head are Q4_1, which {node.name} cannot gather exactly"
        )
    rows = blocks.codes.shape[0]
    shape_name = f"{source}_gguf_embedding_shape"
    row_bytes = blocks.codes.shape[1] * blocks.codes.shape[2]
    shape = np.array([rows, row_bytes], np.int64)
    graph.initializer.append(numpy_helper.from_array(shape, shape_name))
    producer.input[1] = shape_name
    _set_attribute(node, "bits", blocks.bits)
    del node.input[3:]  # the builder's zero points: the head's blocks have none
    return []


def _drop_stale_shapes(graph) -> None:
    """Forget the builder's recorded shapes, which the new bit widths and renamed outputs made
    wrong (onnxruntime infers them again), and the initializers no node reads any more."""
    del graph.value_info[:]
    used = {name for node in graph.node for name in node.input}
    outputs = {output.name for output in graph.output}
    orphans = [node for node in graph.node if node.op_type == "Constant"
               and not any(name in used or name in outputs for name in node.output)]  # fmt: skip
    for node in orphans:
        graph.node.remove(node)
    stale = [tensor for tensor in graph.initializer if tensor.name not in used]
    for tensor in stale:
        graph.initializer.remove(tensor)
