"""Which statements are plain reads: the PostgreSQL profile's deferred BEGIN runs only these.

A plain read is a ``SELECT`` whose rows cannot differ inside or outside a READ COMMITTED
transaction block and which cannot write. Two checks, both must pass, once per compiled
statement (SQLAlchemy caches compiled statements, so each distinct statement is judged once):

* the statement SQLAlchemy compiled (ORM expressions expanded): a :class:`~sqlalchemy.sql.Select`
  with no ``text()``/``literal_column()``, no user-defined operator, no data-modifying CTE and
  no function outside :data:`SAFE_CALLS` (nor one qualified with a schema);
* the SQL text that goes to the driver, which also holds what is only added at compile time
  (``TypeDecorator.column_expression()``/``bind_expression()``, compiler extensions): every
  ``name(`` outside string literals, quoted identifiers and comments must be a keyword
  (``IN (``, ``EXISTS (``, ``CAST(``, ``OVER (`` ...), a type's modifier (``NUMERIC(10, 2)``
  after ``AS`` or ``::``), a CTE's or alias's column list, or a function of
  :data:`SAFE_CALLS` called unqualified; a quoted or schema-qualified name followed by ``(``,
  an operator outside :data:`SAFE_OPERATORS`, locking (``FOR UPDATE``), ``INTO``, the clock
  (``CURRENT_TIMESTAMP``, ``now()``), ``;`` or anything the scanner cannot read (an
  unterminated literal) makes it not plain.

A wrong "not plain" costs one BEGIN; a wrong "plain" would run a write outside the
transaction, so every doubt is "not plain". What the text cannot show is not seen: a view
over a function that writes, a column name PostgreSQL resolves as a function call
(``users.f`` meaning ``f(users)``), a cast to a user type (or domain) whose cast, input
function or ``CHECK`` writes, or a built-in operator name overloaded for a user type.
"""

from __future__ import annotations

import re
import weakref

from sqlalchemy.engine import Compiled, ExecutionContext
from sqlalchemy.sql import Select, operators, visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import BinaryExpression, TextClause
from sqlalchemy.sql.functions import FunctionElement

__all__ = ["SAFE_CALLS", "SAFE_OPERATORS", "is_plain_read", "plain_text"]

SAFE_CALLS = frozenset(
    {
        "coalesce", "nullif", "greatest", "least", "count", "sum", "min", "max", "avg", "every",
        "bool_and", "bool_or", "array_agg", "string_agg", "json_agg", "jsonb_agg",
        "json_build_object", "jsonb_build_object", "json_object_agg", "jsonb_object_agg",
        "lower", "upper", "length", "char_length", "octet_length", "trim", "ltrim", "rtrim",
        "substring", "substr", "position", "replace", "concat", "concat_ws", "left", "right",
        "lpad", "rpad", "abs", "round", "ceil", "ceiling", "floor", "trunc", "mod", "power",
        "sqrt", "date_trunc", "date_part", "extract", "to_char", "to_date", "to_timestamp",
        "to_number", "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile",
        "lag", "lead", "first_value", "last_value", "unnest", "grouping", "generate_series",
    }
)
"""PostgreSQL's own functions that read and change nothing, called unqualified."""

SAFE_OPERATORS = frozenset(
    {
        "=", "<>", "!=", "<", ">", "<=", ">=", "+", "-", "*", "/", "%", "^", "||",
        "~", "~*", "!~", "!~*", "~~", "~~*", "!~~", "!~~*", "@>", "<@", "&&",
        "->", "->>", "#>", "#>>", "?", "?|", "?&", "@@", "-|-", "&<", "&>", "<<", ">>",
        "&", "|", "#",
    }
)
"""The spellings of PostgreSQL's built-in operators SQLAlchemy renders."""

# reserved words (never a function's name) after which "(" opens a group, not a call
_GROUPING_WORDS = frozenset(
    {
        "all", "and", "any", "array", "as", "case", "cast", "distinct", "else", "except",
        "exists", "fetch", "from", "group", "having", "in", "intersect", "lateral", "limit",
        "not", "offset", "on", "only", "or", "row", "select", "some", "then", "union",
        "using", "values", "when", "where", "window", "with",
    }
)
# non-reserved words that open a group only after these words (else they may be a call)
_AFTER: dict[str, frozenset[str]] = {
    "by": frozenset({"order", "group", "partition"}),
    "materialized": frozenset({"as", "not"}),
    "sets": frozenset({"grouping"}),
    "varying": frozenset({"character", "char", "bit"}),  # CHARACTER VARYING(10)
}
# "(" after these non-reserved words opens a clause of the expression before them only
# after ")": f(x) OVER (...), f(x) FILTER (...)
_CLAUSE_AFTER_CLOSE = frozenset({"over", "filter"})
# after these tokens a name followed by "(" is a type's modifier or a column list, not a call
_NAME_NOT_CALLED_AFTER = frozenset({"as", "::", "with", "recursive"})
# words after which "join(" would be a call of a function named join (which PostgreSQL
# allows): keywords that an expression follows
_BEFORE_AN_EXPRESSION = _GROUPING_WORDS | {
    "like", "ilike", "similar", "is", "to", "escape", "zone", "by", "overlaps", "between",
    "symmetric", "asymmetric", "operator", "uescape", "tablesample", "collate", "both",
    "leading", "trailing", "for", "placing", "returning", "default", "variadic", "over",
    "filter", "first", "next", "preceding", "following", "rows", "range", "groups",
}

# locking reads, SELECT INTO, and the clock: CURRENT_TIMESTAMP is the transaction's start
_NOT_PLAIN = re.compile(
    r"\bFOR\s+(UPDATE|SHARE|NO\s+KEY\s+UPDATE|KEY\s+SHARE)\b|\bINTO\b"
    r"|\b(CURRENT_TIMESTAMP|CURRENT_TIME|CURRENT_DATE|LOCALTIME|LOCALTIMESTAMP)\b",
    re.I,
)

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>--[^\n]*)
    | (?P<string>[eE]'(?:[^'\\]|\\.|'')*'      # E'...' with backslash escapes
        | (?:[uU]&|[bBxXnN])?'(?:[^']|'')*')   # '...', U&'...', B'...', X'...', N'...'
    | (?P<quoted>(?:[uU]&)?"(?:[^"]|"")*")
    | (?P<param>\$\d+)
    | (?P<dollar>\$(?:[^\W\d]\w*)?\$)
    | (?P<word>[^\W\d][\w$]*)
    | (?P<number>0[xXoObB][0-9a-fA-F_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?)
    | (?P<cast>::)
    | (?P<op>[-+*/<>=~!@#%^&|`?]+)
    | (?P<punct>[(),.\[\]:])
    """,
    re.X | re.S,
)


def plain_text(sql: str) -> bool:
    """Whether the SQL text calls only functions of :data:`SAFE_CALLS`, unqualified, and
    only operators of :data:`SAFE_OPERATORS` (see the module docstring)."""
    if _NOT_PLAIN.search(sql):
        return False
    # significant tokens so far: (kind, lower-cased text)
    tokens: list[tuple[str, str]] = []
    pos, end = 0, len(sql)
    while pos < end:
        if sql.startswith("/*", pos):  # nested block comments
            depth, pos = 1, pos + 2
            while depth:
                opening, closing = sql.find("/*", pos), sql.find("*/", pos)
                if closing < 0:
                    return False  # unterminated: not understood
                if 0 <= opening < closing:
                    depth, pos = depth + 1, opening + 2
                else:
                    depth, pos = depth - 1, closing + 2
            continue
        match = _TOKEN.match(sql, pos)
        if match is None:
            return False  # ";", or a character the scanner does not know
        kind, text = match.lastgroup or "", match.group()
        pos = match.end()
        if kind == "dollar":  # $tag$ ... $tag$
            closing = sql.find(text, pos)
            if closing < 0:
                return False
            pos, kind = closing + len(text), "string"
        elif kind == "op":
            # "--" or "/*" inside an operator starts a comment in PostgreSQL's lexer
            if "--" in text or "/*" in text or text not in SAFE_OPERATORS:
                return False
        elif kind in ("space", "comment"):
            continue
        elif text == "(" and not _opens_group(tokens):
            return False
        tokens.append((kind, text.lower()))
    return True


def _opens_group(tokens: list[tuple[str, str]]) -> bool:
    """Whether "(" after ``tokens`` opens a group, a list or a type modifier, not a call
    of a function outside :data:`SAFE_CALLS`."""
    if not tokens or tokens[-1][0] not in ("word", "quoted"):
        return True  # after "(", ",", an operator, a literal, ...: a parenthesised group
    kind, name = tokens[-1]
    before_kind, before = tokens[-2] if len(tokens) > 1 else ("", "")
    if before in _NAME_NOT_CALLED_AFTER:
        return True  # CAST(x AS NUMERIC(10, 2)), x::VARCHAR(5), AS t(a, b), WITH c(a) AS
    if before == "." or kind == "quoted":
        return False  # schema.f(, "f"(: a function that is not one of PostgreSQL's own
    if name in _GROUPING_WORDS or before in _AFTER.get(name, ()):
        return True
    if name in _CLAUSE_AFTER_CLOSE:
        return before == ")"
    if name == "join":  # a JOIN (b JOIN c ON ...) ON ..., but not SELECT join(...)
        return before == ")" or before_kind == "quoted" or (
            before_kind == "word" and before not in _BEFORE_AN_EXPRESSION
        )
    return name in SAFE_CALLS


# verdicts per compiled statement
_verdicts: weakref.WeakKeyDictionary[Compiled, bool] = weakref.WeakKeyDictionary()


def is_plain_read(context: ExecutionContext | None, sql: str) -> bool:
    """True for a SELECT built with SQLAlchemy whose rows cannot differ inside or outside a
    READ COMMITTED transaction block and which calls no function that could write.

    Hand-written SQL (``text()``, ``exec_driver_sql()``) is never judged plain.
    """
    compiled = None if context is None else context.compiled
    if compiled is None:
        return False
    verdict = _verdicts.get(compiled)
    if verdict is None:
        # an ORM statement's compile state holds the Core SELECT actually compiled, with
        # column_property() and other ORM expressions expanded
        state = getattr(compiled, "compile_state", None)
        statement = getattr(state, "statement", None)
        if statement is None:
            statement = compiled.statement
        verdict = _plain_select(statement) and plain_text(sql)
        _verdicts[compiled] = verdict
    return verdict


def _plain_select(statement: object) -> bool:
    if not isinstance(statement, Select):
        return False
    for element in visitors.iterate(statement):
        if isinstance(element, FunctionElement):
            name = str(getattr(element, "name", ""))
            if getattr(element, "packagenames", ()) or name.lower() not in SAFE_CALLS:
                return False  # also schema.lower(), which is not pg_catalog's lower()
        elif isinstance(element, TextClause) or (
            getattr(element, "is_literal", False) and getattr(element, "name", None) != "*"
        ):
            return False  # text() and literal_column() (but count()'s *): unjudged SQL
        elif isinstance(element, BinaryExpression) and isinstance(
            element.operator, operators.custom_op
        ):
            return False  # a user-defined operator runs a function of its own
        elif isinstance(element, UpdateBase):
            return False  # INSERT/UPDATE/DELETE ... RETURNING in a CTE
    return True
