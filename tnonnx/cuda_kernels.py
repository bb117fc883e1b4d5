"""The CUDA provider's kernels, for --target gpu's check that no node falls back to the CPU.

The onnxruntime wheels do not list the CUDA provider's kernels (the CPU wheel has no CUDA
provider to ask), so the list is taken from onnxruntime's docs/OperatorKernels.md, which
onnxruntime generates from the registered kernels (tools/python/gen_opkernel_doc.py): the
"Operators implemented by CUDAExecutionProvider" table, default and com.microsoft domains,
as of the onnxruntime 1.3x series. Opset ranges are not kept: every op below has a kernel
at the opsets tnonnx writes (7..26), and the types are reduced to "has a float16 kernel".
"""

from __future__ import annotations

import onnx

# default domain, with a float16 kernel
FP16 = frozenset("""
Abs Add Affine ArgMax ArgMin Attention AveragePool BatchNormalization Cast Ceil Clip Compress
Concat ConcatFromSequence ConstantOfShape Conv ConvTranspose Cos Crop CumSum DepthToSpace
DequantizeLinear Div Dropout DynamicSlice Einsum Elu Equal Erf Exp Expand Flatten Floor GRU
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual
HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop MatMul Max MaxPool Min Mod Mul
Neg NonZero OneHot PRelu Pad ParametricSoftplus Pow QuantizeLinear RMSNormalization RNN
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
Relu Reshape Resize ReverseSequence RotaryEmbedding Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert
SequenceLength Shape Shrink Sigmoid Sign SimplifiedLayerNormalization Sin Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh TensorScatter ThresholdedRelu Tile
TopK Transpose Trilu Unsqueeze Upsample Where
""".split())
# default domain, no kernel needed: onnxruntime turns them into initializers when loading
NO_KERNEL = frozenset({"Constant"})
# default domain, kernels for other types only (bool, int8, float32)
OTHER = frozenset("And Not Or Xor EyeLike GridSample Range RoiAlign MatMulInteger".split())
# com.microsoft ops with a float16 CUDA kernel that onnxruntime's quantizers and fusions write
CONTRIB_FP16 = frozenset("""
Attention BiasAdd BiasGelu BiasSoftmax DequantizeLinear EmbedLayerNormalization FastGelu FusedMatMul
Gelu GroupNorm MatMulNBits MultiHeadAttention NhwcConv
""".split())


def fallbacks(model: onnx.ModelProto) -> list[str]:
    """Nodes of the main graph the CUDA provider has no kernel for (at their precision):
    onnxruntime would run them on the CPU, copying their tensors across."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    out = []
    for node in model.graph.node:
        half = any(types.get(t) == onnx.TensorProto.FLOAT16 for t in (*node.input, *node.output))
        if node.domain in ("", "ai.onnx"):
            ok = node.op_type in FP16 | NO_KERNEL or (not half and node.op_type in OTHER)
        elif node.domain == "com.microsoft":
            ok = node.op_type in CONTRIB_FP16
        else:
            ok = False
        if not ok:
            domain = node.domain or "ai.onnx"
            out.append(f"{node.name or node.op_type} ({domain}:{node.op_type}{' in float16' if half else ''})")
    return out
