"""Load a kernel's machine code (an ELF relocatable object that LLVM emitted: fresh from
jit.compile_module, or from the on-disk cache) without LLVM's loader.

A session whose kernels all come from the on-disk cache then never loads libllvmlite: importing
it and starting one MCJIT engine cost ~60 MB of resident memory (35 MB of the library's own
pages, the rest MCJIT's), a quarter of a 90%-sparse BERT-base session.

What MCJIT gives us is small: code in the large code model (`.ltext`, absolute 64-bit
addresses), constant pools, jump tables, and calls to helpers exported by name
(jit.export_symbol). This loader places the allocated sections in one anonymous mapping
(code, then read-only data, then writable data, each on its own pages), applies the RELA
relocations (R_X86_64_64, PC32, PLT32, PC64), and makes the code pages read + execute and the
constants read-only (never writable and executable at once). Unwind tables (`.eh_frame`) are
left out: generated kernels neither throw nor are unwound through.

Anything else (another machine or OS, a relocation type or symbol kind we do not handle, a
truncated file) raises UnsupportedObject, and the caller falls back to MCJIT.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
import sys
import weakref

_EM_X86_64 = 62
_ET_REL = 1
_SHT_PROGBITS, _SHT_SYMTAB, _SHT_RELA, _SHT_NOBITS, _SHT_REL = 1, 2, 4, 8, 9
_SHT_X86_64_UNWIND = 0x70000001
_SHF_WRITE, _SHF_ALLOC, _SHF_EXECINSTR = 1, 2, 4
_SHN_UNDEF, _SHN_LORESERVE, _SHN_ABS = 0, 0xFF00, 0xFFF1
_R_NONE, _R_64, _R_PC32, _R_PLT32, _R_PC64 = 0, 1, 2, 4, 24
_STT_FUNC = 2
_PAGE = mmap.PAGESIZE

_SECTION = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")


class UnsupportedObject(Exception):
    """The object cannot be loaded here without LLVM (the caller uses MCJIT instead)."""


ENV_SWITCH = "SPARSEDNN_ELF_LOADER"  # "0": always load through MCJIT


def supported() -> bool:
    """Whether this process loads objects without LLVM (Linux on x86-64, unless switched off)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


_libc = None


def _c():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long)  # fmt: skip
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        _libc = libc
    return _libc


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class LoadedObject:
    """The object's sections in memory, relocated; its code lives as long as this does."""

    def __init__(self, obj: bytes, symbols: dict[str, int]):
        self._symbols: dict[str, int] = {}
        self.functions: list[tuple[str, int, int]] = []  # (name, address, size), for profilers
        self.base, self.size = 0, 0
        try:
            self._load(bytes(obj), symbols)
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as e:
            raise UnsupportedObject(f"malformed object: {e}") from None

    def address(self, name: str) -> int:
        """The address of a defined symbol, 0 if the object has none of that name."""
        return self._symbols.get(name, 0)

    def _load(self, obj: bytes, symbols: dict[str, int]) -> None:
        def string_at(offset: int) -> str:  # a NUL-terminated name of a string table
            return obj[offset : obj.index(b"\0", offset)].decode()

        if obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] != 1:
            raise UnsupportedObject("not a little-endian ELF64 object")
        e_type, e_machine = struct.unpack_from("<HH", obj, 16)
        if e_type != _ET_REL or e_machine != _EM_X86_64:
            raise UnsupportedObject(f"not an x86-64 relocatable object ({e_type}, {e_machine})")
        (shoff,) = struct.unpack_from("<Q", obj, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", obj, 0x3A)
        if shentsize != _SECTION.size or shnum == 0 or shstrndx >= shnum:
            raise UnsupportedObject("unexpected section table")
        sections = [_SECTION.unpack_from(obj, shoff + i * shentsize) for i in range(shnum)]
        for _, _, _, _, off, size, *_ in sections:
            if off + size > len(obj) and size:
                raise UnsupportedObject("a section runs past the end of the object")
        names_off = sections[shstrndx][4]

        def section_name(i: int) -> str:
            return string_at(names_off + sections[i][0])

        # Which sections to place, and where: code, read-only, writable; each group on pages
        # of its own so that each can get its own protection.
        def group(i):
            sh_type, flags = sections[i][1], sections[i][2]
            if not flags & _SHF_ALLOC or sections[i][5] == 0:
                return None
            if sh_type == _SHT_X86_64_UNWIND or section_name(i) == ".eh_frame":
                return None
            if sh_type not in (_SHT_PROGBITS, _SHT_NOBITS):
                raise UnsupportedObject(f"section {section_name(i)} of type {sh_type:#x}")
            return 0 if flags & _SHF_EXECINSTR else (2 if flags & _SHF_WRITE else 1)

        place: dict[int, int] = {}  # section index -> offset in the mapping
        bounds = []
        offset = 0
        for g in range(3):
            start = offset
            for i in range(shnum):
                if group(i) == g:
                    offset = _round_up(offset, max(1, sections[i][8]))
                    place[i] = offset
                    offset += sections[i][5]
            offset = _round_up(offset, _PAGE)
            bounds.append((start, offset))
        if not place:
            raise UnsupportedObject("no code")
        size = offset
        libc = _c()
        base = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)  # fmt: skip
        if base in (None, ctypes.c_void_p(-1).value):
            raise MemoryError(f"mmap of {size} bytes for kernel code failed")
        self.base, self.size = base, size
        weakref.finalize(self, libc.munmap, base, size)
        for i, at in place.items():
            if sections[i][1] == _SHT_PROGBITS:
                data = obj[sections[i][4] : sections[i][4] + sections[i][5]]
                ctypes.memmove(base + at, data, len(data))

        symtab = [i for i in range(shnum) if sections[i][1] == _SHT_SYMTAB]
        if len(symtab) != 1:
            raise UnsupportedObject("expected one symbol table")
        sym_sec = sections[symtab[0]]
        str_off = sections[sym_sec[6]][4]

        def sym_name(st_name: int) -> str:
            return string_at(str_off + st_name)

        addresses, names = [], []  # per symbol: its address (None: in a section left out)
        for j in range(sym_sec[5] // _SYMBOL.size):
            st_name, info, _, shndx, value, size = _SYMBOL.unpack_from(obj, sym_sec[4] + j * 24)
            name = sym_name(st_name) if st_name else ""
            if shndx == _SHN_UNDEF:
                addr = symbols.get(name, 0) if name else 0
            elif shndx == _SHN_ABS:
                addr = value
            elif shndx >= _SHN_LORESERVE:
                raise UnsupportedObject(f"symbol {name!r} in special section {shndx:#x}")
            else:
                addr = base + place[shndx] + value if shndx in place else None
            addresses.append(addr)
            names.append(name)
            if name and addr and shndx != _SHN_UNDEF and info & 0xF == _STT_FUNC:
                self.functions.append((name, addr, size))
            if name and addr and shndx != _SHN_UNDEF and info >> 4 != 0:  # global or weak
                self._symbols[name] = addr

        for i in range(shnum):
            sh_type, target = sections[i][1], sections[i][7]
            if sh_type == _SHT_REL:
                raise UnsupportedObject("REL relocations")
            if sh_type != _SHT_RELA or target not in place:
                continue  # e.g. .rela.eh_frame: its section is not loaded
            at0 = base + place[target]
            for j in range(sections[i][5] // _RELA.size):
                r_offset, r_info, addend = _RELA.unpack_from(obj, sections[i][4] + j * 24)
                kind, sym = r_info & 0xFFFFFFFF, r_info >> 32
                if kind == _R_NONE:
                    continue
                if r_offset + (4 if kind in (_R_PC32, _R_PLT32) else 8) > sections[target][5]:
                    raise UnsupportedObject("relocation outside its section")
                s = addresses[sym]
                if s is None:
                    raise UnsupportedObject("relocation against a section left out")
                if s == 0 and sym != 0:
                    raise UnsupportedObject(f"undefined symbol {names[sym]!r} (not exported)")
                p = at0 + r_offset
                if kind == _R_64:
                    ctypes.c_uint64.from_address(p).value = (s + addend) & (2**64 - 1)
                elif kind == _R_PC64:
                    ctypes.c_uint64.from_address(p).value = (s + addend - p) & (2**64 - 1)
                elif kind in (_R_PC32, _R_PLT32):
                    d = s + addend - p
                    if not -(2**31) <= d < 2**31:
                        raise UnsupportedObject("32-bit relative relocation out of range")
                    ctypes.c_int32.from_address(p).value = d
                else:
                    raise UnsupportedObject(f"relocation type {kind}")

        for (start, end), prot in zip(bounds, (mmap.PROT_READ | mmap.PROT_EXEC, mmap.PROT_READ,
                                               mmap.PROT_READ | mmap.PROT_WRITE)):  # fmt: skip
            if end > start and libc.mprotect(base + start, end - start, prot) != 0:
                raise OSError(ctypes.get_errno(), "mprotect of kernel code failed")
