"""Graph rewrites with ``torch.fx``: :func:`fuse` (batch norm + add + ReLU into
``BatchNormAct*d``) and :func:`fold` (eval batch norm into the preceding Conv/Linear)."""

import copy
import operator

import torch
import torch.fx

from ._act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ._batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

_NN_BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
_ACT_CLASS = {torch.nn.BatchNorm1d: BatchNormAct1d, torch.nn.BatchNorm2d: BatchNormAct2d,
              torch.nn.BatchNorm3d: BatchNormAct3d, BatchNorm1d: BatchNormAct1d, BatchNorm2d: BatchNormAct2d,
              BatchNorm3d: BatchNormAct3d}
_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_FOLDABLE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


class _Tracer(torch.fx.Tracer):
    """torch's tracer, with fastbn's batch-norm modules kept as leaves (their forward
    calls custom operators fx need not see)."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, _NN_BATCHNORMS) or super().is_leaf_module(m, qualname)


def _trace(model, caller):
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise TypeError(f"model: fastbn.torch.{caller} needs a model torch.fx can trace symbolically; tracing "
                        f"{type(model).__name__} failed with {type(error).__name__}: {error}") from error
    return graph


def _module_calls(graph):
    """How many call_module nodes call each module path."""
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _is_relu(node, modules):
    if node.op == "call_module":
        return isinstance(modules.get(node.target), torch.nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _add_operands(node):
    """The two tensors a plain add node adds (no alpha), or None."""
    plain_function = node.op == "call_function" and node.target in _ADD_FUNCTIONS
    plain_method = node.op == "call_method" and node.target in ("add", "add_")
    if (plain_function or plain_method) and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fusable_chain(bn_node, modules, calls):
    """(relu_node, residual_node or None) when bn_node -> [add ->] relu can be fused."""
    if type(modules.get(bn_node.target)) not in _ACT_CLASS or calls[bn_node.target] != 1:
        return None
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return None
    user = _only_user(bn_node)
    if user is None:
        return None
    if _is_relu(user, modules) and user.args[0] is bn_node:
        return user, None
    operands = _add_operands(user)
    if operands is None or not all(isinstance(a, torch.fx.Node) for a in operands):
        return None
    residual = operands[1] if operands[0] is bn_node else operands[0]
    if residual is bn_node:
        return None
    relu = _only_user(user)
    if relu is not None and _is_relu(relu, modules) and relu.args[0] is user:
        return relu, residual
    return None


def _act_module(bn):
    act = _ACT_CLASS[type(bn)](bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    # Share, not copy: optimizers holding the parameters keep training the same tensors.
    act.weight, act.bias = bn.weight, bn.bias
    act.running_mean, act.running_var = bn.running_mean, bn.running_var
    act.num_batches_tracked = bn.num_batches_tracked
    return act.train(bn.training)


def _set_module(root, path, module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """Replace ``BatchNorm*d -> ReLU`` and ``BatchNorm*d -> add -> ReLU`` chains by
    :class:`BatchNormAct1d/2d/3d` (the ReLU a module, ``F.relu``/``torch.relu``/``.relu()``,
    inplace or not; the add ``+``, ``+=``, ``torch.add`` or ``.add()`` without alpha).

    A chain is fused when each link is the only user of the previous one and the batch
    norm (``torch.nn`` or ``fastbn.torch``, exact classes) is called at this one place
    in the model; everything else is left as it was.  The new modules take the batch
    norms' places (same ``state_dict`` keys) and share their parameters and buffers.

    Returns a ``torch.fx.GraphModule``.  A model torch.fx cannot trace symbolically
    (data-dependent control flow, ...) raises TypeError naming fx's reason.
    """
    graph = _trace(model, "fuse")
    modules = dict(model.named_modules())
    calls = _module_calls(graph)
    replaced = {}
    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module":
            continue
        chain = _fusable_chain(bn_node, modules, calls)
        if chain is None:
            continue
        relu, residual = chain
        replaced[bn_node.target] = _act_module(modules[bn_node.target])
        with graph.inserting_before(relu):
            args = (bn_node.args[0],) if residual is None else (bn_node.args[0], residual)
            fused = graph.call_module(bn_node.target, args)
        relu.replace_all_uses_with(fused)
        add = None if residual is None else _only_user(bn_node)
        for node in (relu, add, bn_node):
            if node is not None:
                graph.erase_node(node)
    graph.lint()
    # GraphModule copies the modules the graph calls into fresh containers, so setting
    # the new modules on it leaves the caller's model as it was.
    fused_model = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    for path, act in replaced.items():
        _set_module(fused_model, path, act)
    return fused_model


def fold(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of eval-mode ``model`` with every eval-mode ``BatchNorm*d`` that directly
    follows a ``Conv1d/2d/3d`` or ``Linear`` (and is that layer's only user; the layer
    called at one place) folded into the layer's weight and bias, computed in float64::

        scale = weight / sqrt(running_var + eps)
        W' = W * scale (per output channel);  b' = (b - running_mean) * scale + bias

    Grouped and depthwise convolutions fold the same way (the output channel is dim 0
    of their weight); a layer without bias gets one.  A Linear folds into a
    ``BatchNorm1d`` over its out_features (2-D (N, F) input).  Other batch norms are
    left as they are.  ``model`` itself is not modified.

    Returns a ``torch.fx.GraphModule``; raises ValueError for a model in training mode
    and TypeError for one torch.fx cannot trace.
    """
    if model.training:
        raise ValueError("model: fastbn.torch.fold expected a model in eval mode (folding uses the running "
                         "statistics; call model.eval() first), got one in training mode")
    model = copy.deepcopy(model)
    graph = _trace(model, "fold")
    modules = dict(model.named_modules())
    calls = _module_calls(graph)
    for bn_node in list(graph.nodes):
        bn = modules.get(bn_node.target) if bn_node.op == "call_module" else None
        if not isinstance(bn, _NN_BATCHNORMS) or bn.training or bn.running_mean is None:
            continue
        source = bn_node.args[0] if len(bn_node.args) == 1 else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        layer = modules.get(source.target)
        if type(layer) not in _FOLDABLE or calls[source.target] != 1:
            continue
        out_features = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
        if out_features != bn.num_features:
            continue
        _fold_into(layer, bn)
        bn_node.replace_all_uses_with(source)
        graph.erase_node(bn_node)
    graph.lint()
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)


@torch.no_grad()
def _fold_into(layer, bn):
    """Fold ``bn``'s affine map into ``layer``'s weight and bias, in float64."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    layer.weight = torch.nn.Parameter(weight.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = torch.nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
