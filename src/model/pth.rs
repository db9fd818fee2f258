//! Reader of PyTorch's *legacy* checkpoint format (`torch.save` before 1.6, `_use_new_zipfile_serialization=False`), without PyTorch.
//!
//! Such a file is a run of pickles — the magic number, the protocol version, a system-info dict,
//! the object (here a state dict: an `OrderedDict` of name → tensor, each tensor pickled as
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` with its storage a
//! persistent id `('storage', torch.FloatStorage, key, location, numel, None)`), the list of
//! storage keys — followed by each storage in that order as an 8-byte little-endian element count
//! and its raw little-endian elements. Tensors may be strided (TF-converted weights are), so each
//! is gathered into a contiguous row-major array.
//!
//! The pickle machine implements what such files use (protocol 2 plus the common protocol 4
//! opcodes) and knows four globals: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`
//! and the storage classes. Anything else is an error naming the opcode or global and the byte
//! offset, never a panic: a damaged file cannot index out of bounds or allocate without limit.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::graph::Tensor;
use crate::{Error, Result};

/// The first pickle of every legacy file.
const MAGIC: u128 = 0x1950a86a20f9469cfc6c;
/// Dimensions above this are refused (no checkpoint tensor has more).
const MAX_RANK: usize = 8;

/// Element type of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F32,
    F64,
    F16,
    I64,
    I32,
    U8,
}

impl Elem {
    fn from_class(name: &str) -> Option<Elem> {
        Some(match name {
            "FloatStorage" => Elem::F32,
            "DoubleStorage" => Elem::F64,
            "HalfStorage" => Elem::F16,
            "LongStorage" => Elem::I64,
            "IntStorage" => Elem::I32,
            "ByteStorage" => Elem::U8,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::F64 | Elem::I64 => 8,
            Elem::F16 => 2,
            Elem::U8 => 1,
        }
    }
}

/// A value on the pickle machine's stack. (Float and byte payloads are only shown in errors.)
#[derive(Debug, Clone)]
#[allow(dead_code)]
enum Obj {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Obj>),
    List(Vec<Obj>),
    /// Dicts and OrderedDicts, in insertion order.
    Dict(Vec<(Obj, Obj)>),
    Global(String, String),
    Storage {
        elem: Elem,
        key: String,
    },
    Tensor(TensorRef),
    Mark,
}

#[derive(Debug, Clone)]
struct TensorRef {
    elem: Elem,
    key: String,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) => "int",
            Obj::Float(_) => "float",
            Obj::Str(_) => "str",
            Obj::Bytes(_) => "bytes",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Global(..) => "global",
            Obj::Storage { .. } => "storage",
            Obj::Tensor(_) => "tensor",
            Obj::Mark => "mark",
        }
    }
}

/// One pickle machine run over `data[pos..]`; returns the object and the position after STOP.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Obj>,
    memo: HashMap<u32, Obj>,
    path: &'a Path,
}

impl<'a> Machine<'a> {
    fn err(&self, problem: impl Into<String>) -> Error {
        Error::Pretrained { path: self.path.to_path_buf(), problem: problem.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(self.err(format!("the file ends inside a pickle (byte {}, {n} more expected)", self.pos)));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.err(format!("unterminated text argument at byte {}", self.pos)));
        };
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn text(&mut self, n: usize) -> Result<String> {
        let at = self.pos;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("string at byte {at} is not UTF-8")))
    }

    fn pop(&mut self) -> Result<Obj> {
        match self.stack.pop() {
            Some(Obj::Mark) | None => Err(self.err(format!("stack underflow at byte {}", self.pos))),
            Some(o) => Ok(o),
        }
    }

    /// Everything above the topmost mark (the mark removed).
    fn pop_mark(&mut self) -> Result<Vec<Obj>> {
        let Some(i) = self.stack.iter().rposition(|o| matches!(o, Obj::Mark)) else {
            return Err(self.err(format!("no MARK on the stack at byte {}", self.pos)));
        };
        let items = self.stack.split_off(i + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let top = self.stack.last().cloned().ok_or_else(|| self.err("memo store on an empty stack"))?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        let o = self.memo.get(&key).cloned().ok_or_else(|| self.err(format!("memo key {key} was never stored")))?;
        self.stack.push(o);
        Ok(())
    }

    fn run(mut self) -> Result<(Obj, usize)> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?; // PROTO
                    if v > 5 {
                        return Err(self.err(format!("pickle protocol {v} is not supported")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => {
                    let o = self.pop()?;
                    return Ok((o, self.pos));
                }
                b'(' => self.stack.push(Obj::Mark),
                b'N' => self.stack.push(Obj::None),
                0x88 => self.stack.push(Obj::Bool(true)),
                0x89 => self.stack.push(Obj::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Obj::Int(v as i128));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Obj::Int(v as i128));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Obj::Int(v as i128));
                }
                0x8a => {
                    // LONG1: n-byte little-endian two's complement
                    let n = self.u8()? as usize;
                    if n > 16 {
                        return Err(self.err(format!("integer of {n} bytes at byte {at} is too large")));
                    }
                    let b = self.take(n)?;
                    let mut v: i128 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i128) << (8 * i);
                    }
                    if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                        v -= 1i128 << (8 * n);
                    }
                    self.stack.push(Obj::Int(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.stack.push(Obj::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.text(n)?;
                    self.stack.push(Obj::Str(s));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.text(n)?;
                    self.stack.push(Obj::Str(s));
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Obj::Bytes(b));
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Obj::Bytes(b));
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Obj::Bytes(b));
                }
                b')' => self.stack.push(Obj::Tuple(vec![])),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err(format!("stack underflow at byte {at}")));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    if items.iter().any(|o| matches!(o, Obj::Mark)) {
                        return Err(self.err(format!("MARK inside a tuple at byte {at}")));
                    }
                    self.stack.push(Obj::Tuple(items));
                }
                b']' => self.stack.push(Obj::List(vec![])),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::List(items));
                }
                b'}' => self.stack.push(Obj::Dict(vec![])),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = pairs(items).ok_or_else(|| self.err(format!("odd number of dict items at byte {at}")))?;
                    self.stack.push(Obj::Dict(d));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Obj::List(l)) => l.push(v),
                        _ => return Err(self.err(format!("APPEND to a non-list at byte {at}"))),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last_mut() {
                        Some(Obj::List(l)) => l.extend(items),
                        _ => return Err(self.err(format!("APPENDS to a non-list at byte {at}"))),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Obj::Dict(d)) => d.push((k, v)),
                        _ => return Err(self.err(format!("SETITEM on a non-dict at byte {at}"))),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let kv = pairs(items).ok_or_else(|| self.err(format!("odd number of dict items at byte {at}")))?;
                    match self.stack.last_mut() {
                        Some(Obj::Dict(d)) => d.extend(kv),
                        _ => return Err(self.err(format!("SETITEMS on a non-dict at byte {at}"))),
                    }
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32; // MEMOIZE
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Obj::Global(module, name));
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Obj::Str(m), Obj::Str(n)) => self.stack.push(Obj::Global(m, n)),
                        _ => return Err(self.err(format!("STACK_GLOBAL without two strings at byte {at}"))),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let o = self.call(f, args, at)?;
                    self.stack.push(o);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args)
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let o = self.call(f, args, at)?;
                    self.stack.push(o);
                }
                b'b' => {
                    // BUILD: state for the object below; OrderedDict's `_metadata` is ignored.
                    self.pop()?;
                    if self.stack.is_empty() {
                        return Err(self.err(format!("BUILD on an empty stack at byte {at}")));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let o = self.persistent(pid, at)?;
                    self.stack.push(o);
                }
                0x30 => {
                    self.pop()?; // POP
                }
                b'2' => {
                    let top = self.stack.last().cloned().ok_or_else(|| self.err("DUP on an empty stack"))?;
                    self.stack.push(top);
                }
                _ => {
                    return Err(self.err(format!(
                        "unsupported pickle opcode 0x{op:02x} at byte {at} (hiercon reads the opcodes of PyTorch's legacy checkpoints)"
                    )));
                }
            }
        }
    }

    fn call(&self, f: Obj, args: Obj, at: usize) -> Result<Obj> {
        let Obj::Global(module, name) = f else {
            return Err(self.err(format!("call of a {} at byte {at}", f.kind())));
        };
        let Obj::Tuple(args) = args else {
            return Err(self.err(format!("{module}.{name} called with a {} at byte {at}", args.kind())));
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") if args.is_empty() => Ok(Obj::Dict(vec![])),
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                self.rebuild_tensor(&args, at)
            }
            _ => Err(self.err(format!(
                "unexpected object {module}.{name} at byte {at}: hiercon reads state dicts of plain tensors \
                 (OrderedDict, torch._utils._rebuild_tensor_v2, typed storages)"
            ))),
        }
    }

    fn rebuild_tensor(&self, args: &[Obj], at: usize) -> Result<Obj> {
        let bad = |what: &str| self.err(format!("_rebuild_tensor_v2 at byte {at}: {what}"));
        let [storage, offset, size, stride, ..] = args else {
            return Err(bad(&format!("{} arguments, expected at least 4", args.len())));
        };
        let Obj::Storage { elem, key, .. } = storage else {
            return Err(bad(&format!("first argument is a {}, not a storage", storage.kind())));
        };
        let ints = |o: &Obj, what: &str| -> Result<Vec<usize>> {
            match o {
                Obj::Tuple(v) | Obj::List(v) => v
                    .iter()
                    .map(|x| match x {
                        Obj::Int(i) if *i >= 0 && *i <= u32::MAX as i128 => Ok(*i as usize),
                        _ => Err(bad(&format!("{what} holds {x:?}"))),
                    })
                    .collect(),
                _ => Err(bad(&format!("{what} is a {}", o.kind()))),
            }
        };
        let size = ints(size, "size")?;
        let stride = ints(stride, "stride")?;
        if size.len() != stride.len() || size.len() > MAX_RANK {
            return Err(bad(&format!("size {size:?} and stride {stride:?} do not fit")));
        }
        let Obj::Int(offset) = offset else { return Err(bad("the offset is not an integer")) };
        if *offset < 0 || *offset > u32::MAX as i128 {
            return Err(bad(&format!("offset {offset}")));
        }
        Ok(Obj::Tensor(TensorRef { elem: *elem, key: key.clone(), offset: *offset as usize, size, stride }))
    }

    fn persistent(&self, pid: Obj, at: usize) -> Result<Obj> {
        let Obj::Tuple(p) = pid else {
            return Err(self.err(format!("persistent id at byte {at} is a {}", pid.kind())));
        };
        match p.as_slice() {
            [Obj::Str(tag), Obj::Global(_, class), Obj::Str(key), _location, Obj::Int(numel), ..]
                if tag == "storage" =>
            {
                let elem = Elem::from_class(class)
                    .ok_or_else(|| self.err(format!("storage type torch.{class} at byte {at} is not supported")))?;
                if *numel < 0 || *numel > (1i128 << 40) {
                    return Err(self.err(format!("storage {key} claims {numel} elements")));
                }
                Ok(Obj::Storage { elem, key: key.clone() })
            }
            _ => Err(self.err(format!("persistent id at byte {at} is not a storage: {p:?}"))),
        }
    }
}

fn pairs(items: Vec<Obj>) -> Option<Vec<(Obj, Obj)>> {
    if !items.len().is_multiple_of(2) {
        return None;
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Some(out)
}

/// Reads a legacy PyTorch state dict: every tensor, by name, as f32 (float storages) or i64
/// (integer storages), contiguous row-major. Names keep the file's order in `order`.
pub fn read_state_dict(path: &Path) -> Result<(BTreeMap<String, Tensor>, Vec<String>)> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_state_dict(&data, path)
}

/// [`read_state_dict`] over bytes already in memory (`path` only names them in errors).
pub fn parse_state_dict(data: &[u8], path: &Path) -> Result<(BTreeMap<String, Tensor>, Vec<String>)> {
    let err = |problem: String| Error::Pretrained { path: path.to_path_buf(), problem };
    if data.starts_with(b"PK\x03\x04") {
        return Err(err(
            "this is PyTorch's zip checkpoint format; hiercon reads the legacy format (and safetensors)".into()
        ));
    }
    let mut pos = 0;
    let mut next = |what: &str| -> Result<Obj> {
        if pos >= data.len() {
            return Err(err(format!("the file ends before the {what}")));
        }
        let m = Machine { data, pos, stack: vec![], memo: HashMap::new(), path };
        let (o, end) = m.run().map_err(|e| match e {
            Error::Pretrained { path, problem } => Error::Pretrained { path, problem: format!("{what}: {problem}") },
            e => e,
        })?;
        pos = end;
        Ok(o)
    };
    match next("magic number")? {
        Obj::Int(m) if m as u128 == MAGIC => {}
        o => {
            return Err(err(format!(
                "not a PyTorch legacy checkpoint (the first pickle is {o:?}, expected the magic number)"
            )));
        }
    }
    match next("protocol version")? {
        Obj::Int(1001) => {}
        o => return Err(err(format!("unsupported legacy protocol version {o:?} (expected 1001)"))),
    }
    if let Obj::Dict(info) = next("system info")? {
        let little = info.iter().find(|(k, _)| matches!(k, Obj::Str(s) if s == "little_endian"));
        if let Some((_, Obj::Bool(false))) = little {
            return Err(err("the checkpoint was written big-endian".into()));
        }
    }
    let root = next("state dict")?;
    let Obj::Dict(entries) = root else {
        return Err(err(format!("the saved object is a {}, not a state dict", root.kind())));
    };
    let Obj::List(keys) = next("storage key list")? else {
        return Err(err("the storage key list is missing".into()));
    };
    // Storages follow in key order: u64 element count, then the elements (of the size the
    // tensors viewing the storage say; a storage no tensor views is skipped as 4-byte floats).
    let elems: HashMap<&str, Elem> = entries
        .iter()
        .filter_map(|(_, v)| match v {
            Obj::Tensor(t) => Some((t.key.as_str(), t.elem)),
            _ => None,
        })
        .collect();
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for k in &keys {
        let Obj::Str(k) = k else { return Err(err(format!("storage key {k:?} is not a string"))) };
        let head = data.get(pos..pos + 8).ok_or_else(|| err(format!("the file ends before storage {k}")))?;
        let n = u64::from_le_bytes(head.try_into().expect("8 bytes")) as usize;
        pos += 8;
        let size = elems.get(k.as_str()).map_or(4, |e| e.size());
        let bytes = n
            .checked_mul(size)
            .filter(|&b| pos.checked_add(b).is_some_and(|end| end <= data.len()))
            .ok_or_else(|| err(format!("storage {k} claims {n} elements but the file ends first")))?;
        storages.insert(k.clone(), &data[pos..pos + bytes]);
        pos += bytes;
    }
    let mut out = BTreeMap::new();
    let mut order = Vec::new();
    for (k, v) in entries {
        let Obj::Str(name) = k else { return Err(err(format!("state dict key {k:?} is not a string"))) };
        let Obj::Tensor(t) = v else {
            return Err(err(format!("`{name}` is a {}, not a tensor", v.kind())));
        };
        let raw = storages.get(&t.key).ok_or_else(|| err(format!("`{name}`: storage {} is not in the file", t.key)))?;
        let tensor = gather(&t, raw).map_err(|p| err(format!("`{name}`: {p}")))?;
        order.push(name.clone());
        out.insert(name, tensor);
    }
    Ok((out, order))
}

/// The tensor's elements gathered in row-major order from its (possibly strided) storage.
fn gather(t: &TensorRef, raw: &[u8]) -> std::result::Result<Tensor, String> {
    let es = t.elem.size();
    let avail = raw.len() / es;
    let numel: usize = t.size.iter().product();
    if numel > 0 {
        let last: usize = t.offset + t.size.iter().zip(&t.stride).map(|(&s, &st)| (s - 1) * st).sum::<usize>();
        if last >= avail {
            return Err(format!(
                "size {:?}, stride {:?} and offset {} reach element {last} of a storage of {avail}",
                t.size, t.stride, t.offset
            ));
        }
    }
    let mut idx = vec![0usize; t.size.len()];
    let mut offsets = Vec::with_capacity(numel);
    for _ in 0..numel {
        offsets.push(t.offset + idx.iter().zip(&t.stride).map(|(&i, &s)| i * s).sum::<usize>());
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    let at = |o: usize| &raw[o * es..(o + 1) * es];
    let tensor = match t.elem {
        Elem::F32 => {
            Tensor::f32(&t.size, offsets.iter().map(|&o| f32::from_le_bytes(at(o).try_into().unwrap())).collect())
        }
        Elem::F64 => Tensor::f32(
            &t.size,
            offsets.iter().map(|&o| f64::from_le_bytes(at(o).try_into().unwrap()) as f32).collect(),
        ),
        Elem::F16 => Tensor::f32(
            &t.size,
            offsets.iter().map(|&o| f16_to_f32(u16::from_le_bytes(at(o).try_into().unwrap()))).collect(),
        ),
        Elem::I64 => {
            Tensor::i64(&t.size, offsets.iter().map(|&o| i64::from_le_bytes(at(o).try_into().unwrap())).collect())
        }
        Elem::I32 => Tensor::i64(
            &t.size,
            offsets.iter().map(|&o| i32::from_le_bytes(at(o).try_into().unwrap()) as i64).collect(),
        ),
        Elem::U8 => Tensor::i64(&t.size, offsets.iter().map(|&o| raw[o] as i64).collect()),
    };
    tensor.map_err(|e| e.to_string())
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if frac == 0 => sign,
        0 => {
            // subnormal: normalise
            let mut e = -14;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (((e + 127) as u32) << 23) | ((f & 0x3ff) << 13)
        }
        0x1f => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | (((exp - 15 + 127) as u32) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny pickle writer for protocol-2 fixtures.
    #[derive(Default)]
    struct P(Vec<u8>);

    impl P {
        fn op(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend((s.len() as u32).to_le_bytes());
            self.0.extend(s.as_bytes());
            self
        }
        fn int(&mut self, v: u8) -> &mut Self {
            self.op(&[b'K', v])
        }
        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(format!("c{module}\n{name}\n").as_bytes())
        }
        fn ints(&mut self, v: &[u8]) -> &mut Self {
            self.op(b"(");
            for &x in v {
                self.int(x);
            }
            self.op(b"t")
        }
        fn tensor(&mut self, class: &str, key: &str, numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
            self.op(b"(").str("storage").global("torch", class).str(key).str("cpu").int(numel).op(b"NtQ");
            self.int(offset).ints(size).ints(stride).op(b"\x89)tR")
        }
    }

    fn pickle(body: impl FnOnce(&mut P)) -> Vec<u8> {
        let mut p = P::default();
        p.op(b"\x80\x02");
        body(&mut p);
        p.op(b".");
        p.0
    }

    /// magic, protocol, sys info, the state dict, the keys, then the storages.
    fn legacy_file(state: Vec<u8>, keys: &[&str], storages: &[Vec<u8>]) -> Vec<u8> {
        let mut f = pickle(|p| {
            p.op(&[0x8a, 10]).op(&MAGIC.to_le_bytes()[..10]);
        });
        f.extend(pickle(|p| {
            p.op(b"M").op(&1001u16.to_le_bytes());
        }));
        f.extend(pickle(|p| {
            p.op(b"}(").str("little_endian").op(b"\x88u");
        }));
        f.extend(state);
        f.extend(pickle(|p| {
            p.op(b"(");
            for k in keys {
                p.str(k);
            }
            p.op(b"l");
        }));
        for s in storages {
            f.extend(s);
        }
        f
    }

    fn storage_f32(v: &[f32]) -> Vec<u8> {
        let mut b = (v.len() as u64).to_le_bytes().to_vec();
        v.iter().for_each(|x| b.extend(x.to_le_bytes()));
        b
    }

    fn two_tensors() -> Vec<u8> {
        let state = pickle(|p| {
            p.global("collections", "OrderedDict").op(b")R(");
            // `w`: 2x3 over storage "0" with strides (1, 2): column-major, as TF-converted weights.
            p.str("w").tensor("FloatStorage", "0", 6, 0, &[2, 3], &[1, 2]);
            // `b`: the last two elements of storage "1"; `n`: an integer counter.
            p.str("b").tensor("FloatStorage", "1", 3, 1, &[2], &[1]);
            p.str("n").tensor("LongStorage", "2", 1, 0, &[], &[]);
            p.op(b"u");
        });
        let long = {
            let mut b = 1u64.to_le_bytes().to_vec();
            b.extend(7i64.to_le_bytes());
            b
        };
        legacy_file(
            state,
            &["0", "1", "2"],
            &[storage_f32(&[0., 1., 2., 3., 4., 5.]), storage_f32(&[9., 8., 7.]), long],
        )
    }

    #[test]
    fn reads_strided_tensors_in_row_major_order() {
        let (t, order) = parse_state_dict(&two_tensors(), Path::new("x.pth")).unwrap();
        assert_eq!(order, ["w", "b", "n"]);
        let w = t["w"].as_f32().unwrap();
        assert_eq!(w.shape(), [2, 3]);
        assert_eq!(w.iter().copied().collect::<Vec<_>>(), [0., 2., 4., 1., 3., 5.]);
        assert_eq!(t["b"].as_f32().unwrap().iter().copied().collect::<Vec<_>>(), [8., 7.]);
        assert_eq!(t["n"].as_i64().unwrap().iter().copied().collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn damaged_and_foreign_files_are_named_errors() {
        let good = two_tensors();
        let msg = |data: &[u8]| parse_state_dict(data, Path::new("x.pth")).unwrap_err().to_string();
        // Cut anywhere: inside a pickle, between pickles, inside the storages.
        for cut in [1, 5, 20, 60, good.len() / 2, good.len() - 30, good.len() - 1] {
            let m = msg(&good[..cut]);
            assert!(m.starts_with("pretrained weights x.pth: "), "{cut}: {m}");
            assert!(["ends", "underflow", "MARK", "unterminated"].iter().any(|w| m.contains(w)), "{cut}: {m}");
        }
        assert!(msg(b"PK\x03\x04rest").contains("zip checkpoint format"));
        assert!(
            msg(&pickle(|p| {
                p.int(3);
            }))
            .contains("not a PyTorch legacy checkpoint")
        );
        assert!(msg(b"\x80\x02\xffjunk").contains("unsupported pickle opcode 0xff"));
        // An object that is not a plain tensor.
        let mut evil = good.clone();
        let at = evil.windows(11).position(|w| w == b"OrderedDict").unwrap();
        evil.splice(at..at + 11, b"os_system__".iter().copied());
        assert!(msg(&evil).contains("unexpected object collections.os_system__"), "{}", msg(&evil));
        // A stride reaching past its storage.
        let mut wide = good.clone();
        let at = wide.windows(6).position(|w| w == [b'(', b'K', 1, b'K', 2, b't']).unwrap();
        wide[at + 4] = 9;
        assert!(msg(&wide).contains("`w`: size [2, 3], stride [1, 9]"), "{}", msg(&wide));
    }

    #[test]
    fn half_precision_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
