"""Task templates: YAML with positions, validation, parameters, sandboxed Jinja rendering.

``loader`` turns YAML text into a :class:`Template` or a list of problems with line and column;
``params`` checks a task's parameters; ``render`` evaluates prompts and outputs; ``registry``
holds the templates the service knows.
"""

from orchestra.templating.loader import load_template, parse_template
from orchestra.templating.model import LlmStep, Parameter, Template
from orchestra.templating.registry import TemplateRegistry
from orchestra.templating.source import TemplateProblem

__all__ = [
    "LlmStep",
    "Parameter",
    "Template",
    "TemplateProblem",
    "TemplateRegistry",
    "load_template",
    "parse_template",
]
