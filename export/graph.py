"""The ONNX graph under construction: nodes, initializers, shared constants and the IO table.

Builder functions (`export/layers.py`, `export/builder.py`) take a `Graph` plus the *names* of
their input values and return the names of their outputs; the graph only accumulates. Naming
follows onnxruntime-genai's model builder: nodes are paths (`/model/layers.0/attn/q_proj/MatMul`),
a node's outputs are `{node}/output_{i}`, constants are shared by value
(`/model/constants/FLOAT/1.0`, `/model/constants/INT64/[0,0,4,8]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .weights import Weights

OPSET = 17
MS_DOMAIN = "com.microsoft"

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
BOOL = TensorProto.BOOL

_DTYPE_NAMES = {
    np.dtype(np.float32): "FLOAT",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.bool_): "BOOL",
}


class Graph:
    """Accumulates one ONNX graph; every name it hands out is unique.

    Args:
        weights: the checkpoint tensors; `weight()` records which ones the graph used.
    """

    def __init__(self, weights: Weights):
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.uses_contrib_ops = False
        self._node_names: set[str] = set()

    # -- values ---------------------------------------------------------------------------------

    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def constant(self, value, dtype=np.float32) -> str:
        """A shared constant initializer, named by its dtype and value."""
        array = np.asarray(value, dtype=dtype)
        if array.ndim == 0:
            text = repr(array.item()) if array.dtype.kind == "f" else str(array.item())
        else:
            text = "[" + ",".join(str(v) for v in array.ravel().tolist()) + "]"
        name = f"/model/constants/{_DTYPE_NAMES[array.dtype]}/{text}"
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def tensor(self, name: str, array: np.ndarray) -> str:
        """A named initializer computed at export time (rotary tables, transposed weights)."""
        if name in self.initializers:
            raise ValueError(f"initializer {name} added twice")
        self.initializers[name] = numpy_helper.from_array(np.asarray(array, order="C"), name)
        return name

    def weight(self, key: str, transpose: bool = False) -> str:
        """A checkpoint tensor as an initializer, once; transposed ones are named `{key}.T`."""
        name = f"{key}.T" if transpose else key
        if name not in self.initializers:
            array = self.weights.take(key)
            self.tensor(name, array.T if transpose else array)
        return name

    # -- nodes ----------------------------------------------------------------------------------

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        name: str,
        *,
        domain: str = "",
        outputs: int | Sequence[bool] = 1,
        **attributes,
    ) -> str | list[str]:
        """Append a node called `name`; returns its output name (a list if several).

        Use "" in `inputs` for an omitted optional input. `outputs` is a count, or one flag per
        output position saying whether it is wanted (unwanted optional outputs get ""), e.g.
        `[True, False, False, True]`. Attributes with value None are left out.
        """
        if name in self._node_names:
            raise ValueError(f"node {name} added twice")
        self._node_names.add(name)
        wanted = [True] * outputs if isinstance(outputs, int) else list(outputs)
        out = [f"{name}/output_{i}" if w else "" for i, w in enumerate(wanted)]
        attrs = {k: v for k, v in attributes.items() if v is not None}
        self.nodes.append(
            helper.make_node(op, list(inputs), out, name=name, domain=domain or None, **attrs)
        )
        if domain == MS_DOMAIN:
            self.uses_contrib_ops = True
        return out[0] if len(out) == 1 else out

    def rename_output(self, value: str, name: str) -> None:
        """Make the node that produced `value` write the graph output `name` instead."""
        for node in reversed(self.nodes):
            for i, out in enumerate(node.output):
                if out == value:
                    node.output[i] = name
                    for other in self.nodes:  # later consumers, if any
                        for j, inp in enumerate(other.input):
                            if inp == value:
                                other.input[j] = name
                    return
        raise KeyError(value)

    # -- the model ------------------------------------------------------------------------------

    def to_model(self, doc: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "mlx_transformer",
            self.inputs,
            self.outputs,
            initializer=list(self.initializers.values()),
        )
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_contrib_ops:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="mlx-transformer")
        model.ir_version = 8  # readable by onnxruntime >= 1.14
        model.doc_string = doc
        for key, value in (metadata or {}).items():
            model.metadata_props.add(key=key, value=value)
        return model
