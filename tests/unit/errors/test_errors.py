"""Every public error class of every package has the one root and exactly one branch.

The classes are found through each package's ``__all__``, so a new error class that is exported
without a root (or with two branches) fails here.
"""

from __future__ import annotations

import importlib

import pytest

from errors import InputError, IntegrityError, ProtocolError, UnavailableError, VeilnetError

BRANCHES = (InputError, ProtocolError, IntegrityError, UnavailableError)
PACKAGES = ("crypto", "models", "protocols", "ledger", "consensus", "registry", "node", "client")


def exported_errors(package: str) -> list[type[BaseException]]:
    module = importlib.import_module(package)
    objects = [getattr(module, name) for name in getattr(module, "__all__", ())]
    return [o for o in objects if isinstance(o, type) and issubclass(o, BaseException)]


@pytest.mark.parametrize("package", PACKAGES)
def test_exported_errors_have_one_root_and_one_branch(package: str) -> None:
    for cls in exported_errors(package):
        name = f"{package}.{cls.__name__}"
        assert issubclass(cls, VeilnetError), f"{name} does not derive from VeilnetError"
        branches = [b.__name__ for b in BRANCHES if issubclass(cls, b)]
        assert len(branches) == 1, f"{name} is under {branches or 'no branch'}, not one branch"


def test_errors_are_exported() -> None:
    found = {cls for package in PACKAGES for cls in exported_errors(package)}
    assert len(found) >= 20  # the packages export their errors (not an empty __all__)


def test_old_builtin_bases_are_kept() -> None:
    from ledger import ProofError, StoreError, WitnessRefused
    from models import ManifestError, ModelSourceError
    from registry import CardRejected

    assert issubclass(InputError, ValueError)
    for cls in (ManifestError, ProofError, WitnessRefused, CardRejected):
        assert issubclass(cls, ValueError), cls
    for cls in (StoreError, ModelSourceError):
        assert issubclass(cls, RuntimeError), cls
