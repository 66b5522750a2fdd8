from sparsednn.ir.graph import Dim, Graph, Node, Shape, Value
from sparsednn.ir.printer import format_graph
from sparsednn.ir.verify import verify

__all__ = ["Dim", "Graph", "Node", "Shape", "Value", "format_graph", "verify"]
