"""OData ``$filter`` for the Graph simulator: a parser, the support rules of real Graph, an evaluator.

Which user property takes which operator, by default or only in advanced query mode (the header
``ConsistencyLevel: eventual`` AND ``$count=true``), follows Microsoft's table "Support for filter by
properties of Microsoft Entra ID (directory) objects" (learn.microsoft.com/graph/aad-advanced-queries, the
newer per-operator version of that table). D = works by default, A = needs advanced query parameters,
- = not supported (Graph answers 400 ``Request_UnsupportedQuery``). ``endsWith`` on any property, and
``ne``/``not`` on every property that has ``eq``, need advanced mode; ``in`` works by default wherever ``eq``
does (rules stated on the same page). The properties the exporter cares about:

================================  ====  ====  ==========  =======  =======  ========  ==========
property                          eq    in    startsWith  ge, le   eq null  endsWith  ne, not
================================  ====  ====  ==========  =======  =======  ========  ==========
id                                D     D     -           -        -        -         A
userPrincipalName                 D     D     D           -, D     -        A         A
mail                              D     D     D           D, D     -        A         A
onPremisesSecurityIdentifier      D     D     -           -        A        -         A
onPremisesImmutableId             A     A     -           A, A     -        -         A
onPremisesSamAccountName          A     A     A           A, A     -        -         A
onPremisesSyncEnabled             D     D     -           A, A     -        -         A
onPremisesLastSyncDateTime        A     A     -           A, A     -        -         A
accountEnabled                    D     D     -           A, A     -        -         A
usageLocation                     D     D     D           D, D     -        -         A
createdDateTime                   D     A     -           D, D     -        -         A
displayName                       D     D     D           -        A        -         A
givenName, surname, department    D     D     D           D, D     A        -         A
assignedLicenses (any, skuId)     D     -     -           -        -        -         A (not)
licenseAssignmentStates           -     -     -           -        -        -         -
================================  ====  ====  ==========  =======  =======  ========  ==========

Real Graph was observed to answer ``onPremisesSamAccountName eq 'x'`` without the advanced parameters with
400 ``Request_UnsupportedQuery`` "Unsupported or invalid query filter clause specified for property
'onPremisesSamAccountName' of resource 'User'." (Microsoft Q&A 577870). An older revision of the same table
listed ``onPremisesImmutableId eq`` as default and ``onPremisesSecurityIdentifier eq`` as unsupported; the
simulator follows the newer one. ``assignedLicenses/any(a:a/skuId eq <guid>)`` works by default.

Strings compare case-insensitively, as directory queries do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# property -> eq ne NOT ge le in startsWith null  (D default, A advanced, - unsupported)
_USER_TABLE = """
accountEnabled                 D A A A A D - -
ageGroup                       D A A - - D - -
assignedLicenses               D - A - - - - -
assignedPlans                  D - A - - - - -
businessPhones                 D - A - - - - -
city                           D A A D - D D A
companyName                    A A A A A A A A
consentProvidedForMinor        D A A - - D - -
country                        D A A D D D D A
createdDateTime                D A A D D A - -
creationType                   D A A - - D - -
deletedDateTime                D A A D D A - -
department                     D A A D D D D A
displayName                    D A A - - D D A
employeeHireDate               A A - A A A - -
employeeId                     D A - - A - D A
employeeType                   A A - A A A A -
givenName                      D A - D D D D A
id                             D A A - - - - -
identities                     D - - - - - - -
imAddresses                    D A A D D - D -
jobTitle                       D A - D D D - A
mail                           D A - D D D D -
mailNickname                   D A - D D D D A
mobilePhone                    A A - A A A A A
officeLocation                 A A - A A A A A
onPremisesExtensionAttributes  A A - A A A - -
onPremisesImmutableId          A A - A A A - -
onPremisesLastSyncDateTime     A A - A A A - -
onPremisesSamAccountName       A A - A A A A -
onPremisesSecurityIdentifier   D A - - - D - A
onPremisesSyncEnabled          D A - A A D - -
onPremisesUserPrincipalName    D A - D D D D -
otherMails                     D A - D D D D -
passwordPolicies               A A - - - - - A
postalCode                     A A - A A A A A
preferredLanguage              A A - A A A A A
proxyAddresses                 D A - D D - D A
showInAddressList              A A - A A A - -
state                          D A - D D D D A
streetAddress                  A A - A A A A A
surname                        D A - D D D D A
usageLocation                  D A - D D D D -
userPrincipalName              D A - - D D D -
userType                       D A A - - D - A
"""
_OPERATORS = ("eq", "ne", "not", "ge", "le", "in", "startswith", "null")
ENDS_WITH_PROPERTIES = frozenset({"mail", "otherMails", "userPrincipalName", "proxyAddresses"})


def _parse_table(text: str) -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = {}
    for line in text.strip().splitlines():
        name, *marks = line.split()
        table[name] = {op: mark for op, mark in zip(_OPERATORS, marks, strict=True) if mark != "-"}
        if "eq" in table[name]:
            table[name]["in"] = table[name].get("in") or table[name]["eq"]  # "in" wherever "eq" works
            table[name].setdefault("ne", "A")
            table[name].setdefault("not", "A")
        if name in ENDS_WITH_PROPERTIES:
            table[name]["endswith"] = "A"
    return table


USER_FILTER_SUPPORT: dict[str, dict[str, str]] = _parse_table(_USER_TABLE)
# Intune (managedDevices) takes eq on these; the simulator supports nothing else there.
DEVICE_FILTER_SUPPORT: dict[str, dict[str, str]] = {
    name: {"eq": "D", "in": "D"}
    for name in (
        "id",
        "userId",
        "userPrincipalName",
        "deviceName",
        "operatingSystem",
        "complianceState",
        "managementAgent",
        "azureADDeviceId",
    )
}
INDEXED_PROPERTIES = frozenset(
    {
        "id",
        "userPrincipalName",
        "mail",
        "onPremisesImmutableId",
        "onPremisesSecurityIdentifier",
        "onPremisesSamAccountName",
        "userId",
    }
)


class FilterError(Exception):
    """A filter Graph refuses: `status`, error `code` and message as Graph gives them."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


# ---------------------------------------------------------------------------- syntax tree
@dataclass(frozen=True)
class Compare:
    prop: str
    op: str  # eq ne ge le gt lt
    value: Any


@dataclass(frozen=True)
class In:
    prop: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Function:
    name: str  # startswith, endswith
    prop: str
    value: str


@dataclass(frozen=True)
class Any_:
    prop: str  # the collection
    member: str | None  # property of each element (None: the element itself)
    op: str
    value: Any


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class Logical:
    op: str  # and, or
    left: Node
    right: Node


Node = Compare | In | Function | Any_ | Not | Logical

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^']|'')*')
      | (?P<punct>[(),:])
      | (?P<word>[A-Za-z0-9_.$@#+\-/]+(?::[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?Z?)?)
    )""",
    re.VERBOSE,
)
_LITERALS = {"true": True, "false": False, "null": None}
_COMPARISONS = {"eq", "ne", "ge", "le", "gt", "lt"}


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise FilterError("BadRequest", f"Invalid filter clause: syntax error at position {position}.")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.position = 0

    def parse(self) -> Node:
        if not self.tokens:
            raise FilterError("BadRequest", "Invalid filter clause: the filter is empty.")
        node = self._or()
        if self.position != len(self.tokens):
            raise FilterError("BadRequest", f"Invalid filter clause: unexpected '{self._peek()}'.")
        return node

    def _peek(self) -> str:
        return self.tokens[self.position][1] if self.position < len(self.tokens) else ""

    def _take(self, expected: str | None = None) -> tuple[str, str]:
        if self.position >= len(self.tokens):
            raise FilterError("BadRequest", "Invalid filter clause: the filter ends too early.")
        token = self.tokens[self.position]
        if expected is not None and token[1].lower() != expected:
            raise FilterError(
                "BadRequest", f"Invalid filter clause: expected '{expected}', got '{token[1]}'."
            )
        self.position += 1
        return token

    def _or(self) -> Node:
        node = self._and()
        while self._peek().lower() == "or":
            self._take()
            node = Logical("or", node, self._and())
        return node

    def _and(self) -> Node:
        node = self._unary()
        while self._peek().lower() == "and":
            self._take()
            node = Logical("and", node, self._unary())
        return node

    def _unary(self) -> Node:
        if self._peek().lower() == "not":
            self._take()
            return Not(self._unary())
        if self._peek() == "(":
            self._take("(")
            node = self._or()
            self._take(")")
            return node
        return self._primary()

    def _primary(self) -> Node:
        kind, word = self._take()
        if kind != "word":
            raise FilterError("BadRequest", f"Invalid filter clause: unexpected '{word}'.")
        if word.lower() in {"startswith", "endswith"} and self._peek() == "(":
            self._take("(")
            prop = self._take()[1]
            self._take(",")
            value = self._literal()
            self._take(")")
            if not isinstance(value, str):
                raise FilterError("BadRequest", f"Invalid filter clause: {word} needs a string.")
            return Function(word.lower(), prop, value)
        if "/" in word and word.lower().endswith("/any") and self._peek() == "(":
            return self._lambda(word[: -len("/any")])
        operator = self._take()[1].lower()
        if operator == "in":
            self._take("(")
            values = [self._literal()]
            while self._peek() == ",":
                self._take(",")
                values.append(self._literal())
            self._take(")")
            return In(word, tuple(values))
        if operator not in _COMPARISONS:
            raise FilterError("BadRequest", f"Invalid filter clause: unknown operator '{operator}'.")
        return Compare(word, operator, self._literal())

    def _lambda(self, collection: str) -> Node:
        self._take("(")
        variable = self._take()[1]
        self._take(":")
        target = self._take()[1]
        if target == variable:
            member = None
        elif target.startswith(variable + "/"):
            member = target[len(variable) + 1 :]
        else:
            raise FilterError("BadRequest", f"Invalid filter clause: unknown range variable in '{target}'.")
        operator = self._take()[1].lower()
        if operator not in _COMPARISONS:
            raise FilterError("BadRequest", f"Invalid filter clause: unknown operator '{operator}'.")
        value = self._literal()
        self._take(")")
        return Any_(collection, member, operator, value)

    def _literal(self) -> Any:
        kind, text = self._take()
        if kind == "string":
            return text[1:-1].replace("''", "'")
        if kind != "word":
            raise FilterError("BadRequest", f"Invalid filter clause: expected a value, got '{text}'.")
        if text.lower() in _LITERALS:
            return _LITERALS[text.lower()]
        if re.fullmatch(r"-?[0-9]+", text):
            return int(text)
        return text  # GUIDs and date-times are written without quotes


def parse(text: str) -> Node:
    return _Parser(text).parse()


# ---------------------------------------------------------------------------- support rules
def check_support(
    node: Node, support: Mapping[str, Mapping[str, str]], resource: str, *, advanced: bool
) -> None:
    """Raise FilterError where Graph would refuse the filter (unknown property, operator, mode)."""
    for prop, operator in _uses(node):
        rules = support.get(prop)
        if rules is None:
            raise FilterError(
                "Request_UnsupportedQuery",
                f"Unsupported or invalid query filter clause specified for property '{prop}' "
                f"of resource '{resource}'.",
            )
        mode = rules.get(operator)
        if mode == "A" and not advanced:
            if operator in {"endswith", "ne", "not"}:
                name = {"endswith": "endsWith"}.get(operator, operator)
                raise FilterError(
                    "Request_UnsupportedQuery",
                    f"Operator '{name}' is not supported because the required parameters might be "
                    "missing. Try adding $count=true query parameter and ConsistencyLevel:eventual "
                    "header. Refer to https://aka.ms/graph-docs/advanced-queries for more information",
                )
            mode = None
        if mode is None:
            raise FilterError(
                "Request_UnsupportedQuery",
                f"Unsupported or invalid query filter clause specified for property '{prop}' "
                f"of resource '{resource}'.",
            )


def _uses(node: Node, negated: bool = False) -> Iterable[tuple[str, str]]:
    if isinstance(node, Logical):
        yield from _uses(node.left, negated)
        yield from _uses(node.right, negated)
    elif isinstance(node, Not):
        yield from _uses(node.operand, True)
    elif isinstance(node, Compare):
        yield node.prop, "null" if node.value is None and node.op == "eq" else node.op
        if negated:
            yield node.prop, "not"
    elif isinstance(node, In):
        yield node.prop, "in"
        if negated:
            yield node.prop, "not"
    elif isinstance(node, Function):
        yield node.prop, node.name
        if negated:
            yield node.prop, "not"
    else:
        yield node.prop, node.op if node.op != "eq" else "eq"
        if negated:
            yield node.prop, "not"


def id_scope(node: Node, limit: int = 50) -> frozenset[str]:
    """The ids of a delta query's only supported filter, ``id eq 'a' or id eq 'b' ...`` (at most 50)."""
    ids: set[str] = set()

    def walk(part: Node) -> None:
        if isinstance(part, Logical) and part.op == "or":
            walk(part.left)
            walk(part.right)
        elif (
            isinstance(part, Compare)
            and part.prop == "id"
            and part.op == "eq"
            and isinstance(part.value, str)
        ):
            ids.add(part.value.lower())
        else:
            raise FilterError("Request_UnsupportedQuery", "Unsupported query filter for delta: only 'id eq'.")

    walk(node)
    if len(ids) > limit:
        raise FilterError("Request_UnsupportedQuery", f"A delta filter can name at most {limit} objects.")
    return frozenset(ids)


# ---------------------------------------------------------------------------- evaluation
def matches(node: Node, record: Mapping[str, Any]) -> bool:
    if isinstance(node, Logical):
        if node.op == "and":
            return matches(node.left, record) and matches(node.right, record)
        return matches(node.left, record) or matches(node.right, record)
    if isinstance(node, Not):
        return not matches(node.operand, record)
    if isinstance(node, Compare):
        return _compare(record.get(node.prop), node.op, node.value)
    if isinstance(node, In):
        return any(_compare(record.get(node.prop), "eq", value) for value in node.values)
    if isinstance(node, Function):
        value = record.get(node.prop)
        if not isinstance(value, str):
            return False
        test: Callable[[str], bool] = (
            value.lower().startswith if node.name == "startswith" else value.lower().endswith
        )
        return test(node.value.lower())
    items = record.get(node.prop) or []
    for item in items:
        value = item.get(node.member) if node.member and isinstance(item, Mapping) else item
        if _compare(value, node.op, node.value):
            return True
    return False


def _compare(actual: Any, op: str, expected: Any) -> bool:
    if isinstance(actual, str) and isinstance(expected, str):
        actual, expected = actual.lower(), expected.lower()
    if op == "eq":
        return bool(actual == expected)
    if op == "ne":
        return bool(actual != expected)
    if actual is None or expected is None:
        return False
    try:
        return bool(
            {
                "ge": actual >= expected,
                "le": actual <= expected,
                "gt": actual > expected,
                "lt": actual < expected,
            }[op]
        )
    except TypeError:
        return False


def candidates(node: Node, lookup: Callable[[str, Any], set[str]]) -> set[str] | None:
    """Ids that can match, from equality indexes; None when the filter needs a full scan."""
    if (
        isinstance(node, Compare)
        and node.op == "eq"
        and node.prop in INDEXED_PROPERTIES
        and node.value is not None
    ):
        return lookup(node.prop, node.value)
    if isinstance(node, In) and node.prop in INDEXED_PROPERTIES:
        found: set[str] = set()
        for value in node.values:
            found |= lookup(node.prop, value)
        return found
    if isinstance(node, Logical):
        left, right = candidates(node.left, lookup), candidates(node.right, lookup)
        if node.op == "and":
            if left is None or right is None:
                return left if right is None else right
            return left & right
        return None if left is None or right is None else left | right
    return None
