//! PyTorch `.bin` / `.pt` / `.pth` files (`torch.save`): a zip archive holding `data.pkl` (a
//! pickle) and one member per tensor storage (`data/<key>`).
//!
//! A pickle is a program: `torch.load` without `weights_only` runs whatever it names. This
//! reader never runs anything. It interprets the opcodes that `torch.save` emits for a state
//! dict, builds only plain values (dicts, lists, tuples, strings, numbers) and tensors, and
//! refuses — naming it — any global other than the few that rebuild tensors and ordered dicts
//! (`os.system`, `builtins.eval`, … are named in the error). It is written here rather than
//! taken from candle-core because candle's unpickler accepts every global (it only ignores the
//! ones it does not know) and deep-copies memoised objects, so a hostile pickle of a few KiB
//! can ask for gigabytes; this one shares memoised objects and caps operations and sizes.
//!
//! The zip side refuses member names that are absolute or contain `..`, and reads at most a
//! member's declared size, itself capped by the archive's size (stored members, as `torch.save`
//! writes them, cannot be larger than the archive).

use crate::error::{Category, Error, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

/// Largest `data.pkl` read (a state dict's pickle is a few KiB per tensor).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Most opcodes interpreted.
const MAX_OPS: usize = 20_000_000;
/// Deepest container nesting.
const MAX_DEPTH: usize = 64;

/// The globals a state dict may name, and what they become.
const ALLOWED: [(&str, &str); 8] = [
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "BoolStorage"),
];

#[derive(Debug, Clone)]
enum Value {
    None,
    // Values a state dict carries but this reader does not use (flags, hooks' contents).
    Bool,
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<std::cell::RefCell<Vec<Value>>>),
    Dict(Rc<std::cell::RefCell<Vec<(Value, Value)>>>),
    Global(String, String),
    /// `(storage key, dtype, element count)` from a persistent id.
    Storage(String, StorageDtype, u64),
    Tensor(Rc<TensorRef>),
    Mark,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
    F64,
    Bool,
}

impl StorageDtype {
    fn size(self) -> u64 {
        match self {
            StorageDtype::F64 => 8,
            StorageDtype::F32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 => 2,
            StorageDtype::Bool => 1,
        }
    }

    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            StorageDtype::F64 => safetensors::Dtype::F64,
            StorageDtype::F32 => safetensors::Dtype::F32,
            StorageDtype::F16 => safetensors::Dtype::F16,
            StorageDtype::BF16 => safetensors::Dtype::BF16,
            StorageDtype::Bool => safetensors::Dtype::BOOL,
        }
    }
}

#[derive(Debug)]
struct TensorRef {
    storage: String,
    dtype: StorageDtype,
    storage_len: u64,
    offset: u64,
    shape: Vec<u64>,
    stride: Vec<u64>,
}

/// One tensor of a state dict, with its raw little-endian bytes.
#[derive(Debug)]
pub struct Tensor {
    pub name: String,
    pub dtype: StorageDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// A `torch.save` archive that is cut short or inconsistent.
fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::new(Category::Container, detail).at(path)
}

/// Whether `bytes` start like a zip archive (`torch.save` since PyTorch 1.6).
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// Read the tensors of a `torch.save` state dict, refusing anything else.
pub fn read_state_dict(path: &Path) -> Result<Vec<Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let archive_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 4];
    let mut probe = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    if probe.read_exact(&mut head).is_err() || !is_zip(&head) {
        return Err(Error::unsupported(
            path,
            "not a zip-format PyTorch file (files saved before PyTorch 1.6, or not a PyTorch \
             file at all); re-save it with a current torch, or as safetensors",
        ));
    }
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| bad(path, format!("not a readable zip archive: {e}")))?;
    // Every member name must be a plain relative path; find `<root>/data.pkl`.
    let mut pkl = None;
    let mut members: HashMap<String, usize> = HashMap::new();
    for i in 0..zip.len() {
        let m = zip
            .by_index_raw(i)
            .map_err(|e| bad(path, format!("zip member {i}: {e}")))?;
        let name = m
            .name()
            .map_err(|e| bad(path, format!("zip member {i}: {e}")))?
            .to_string();
        if m.enclosed_name().is_none()
            || name.starts_with('/')
            || name.split(['/', '\\']).any(|c| c == "..")
        {
            return Err(bad(
                path,
                format!("zip member `{name}` is an absolute path or climbs out with `..`: refused"),
            ));
        }
        if m.size() > archive_len.saturating_mul(4).max(1 << 20) {
            return Err(bad(
                path,
                format!(
                    "zip member `{name}` claims {} bytes from a {archive_len}-byte archive: refused \
                     (a decompression bomb, or a corrupt directory)",
                    m.size()
                ),
            ));
        }
        if name.ends_with("/data.pkl") || name == "data.pkl" {
            pkl = Some((i, name.trim_end_matches("data.pkl").to_string()));
        }
        members.insert(name, i);
    }
    let (pkl_index, root) =
        pkl.ok_or_else(|| bad(path, "a zip without `data.pkl`: not a torch.save archive"))?;
    let pickle = read_member(path, &mut zip, pkl_index, MAX_PICKLE_BYTES)?;
    let value = unpickle(path, &pickle)?;
    let entries = match value {
        Value::Dict(d) => d.borrow().clone(),
        other => {
            return Err(bad(
                path,
                format!(
                    "the pickle holds {} where a state dict (a dict of tensors) was expected",
                    kind(&other)
                ),
            ));
        }
    };
    let mut out = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let Value::Str(name) = k else {
            return Err(bad(
                path,
                format!("a state-dict key is {} instead of a string", kind(&k)),
            ));
        };
        let Value::Tensor(t) = v else {
            return Err(bad(
                path,
                format!("`{name}` is {} instead of a tensor", kind(&v)),
            ));
        };
        let member = format!("{root}data/{}", t.storage);
        let index = *members.get(&member).ok_or_else(|| {
            bad(
                path,
                format!("`{name}`: storage member `{member}` is missing"),
            )
        })?;
        let want = t
            .storage_len
            .checked_mul(t.dtype.size())
            .ok_or_else(|| bad(path, format!("`{name}`: storage size overflows")))?;
        let data = read_member(path, &mut zip, index, want)?;
        if (data.len() as u64) < want {
            return Err(bad(
                path,
                format!(
                    "`{name}`: storage `{member}` holds {} bytes, {want} expected (truncated)",
                    data.len()
                ),
            ));
        }
        out.push(Tensor {
            bytes: gather(path, &name, &t, &data)?,
            name,
            dtype: t.dtype,
            shape: t.shape.iter().map(|&d| d as usize).collect(),
        });
    }
    Ok(out)
}

/// Read at most `limit` bytes of member `index`.
fn read_member<R: Read + std::io::Seek>(
    path: &Path,
    zip: &mut zip::ZipArchive<R>,
    index: usize,
    limit: u64,
) -> Result<Vec<u8>> {
    let m = zip
        .by_index(index)
        .map_err(|e| bad(path, format!("zip member {index}: {e}")))?;
    let declared = m.size();
    if declared > limit {
        return Err(bad(
            path,
            format!(
                "zip member `{}` is {declared} bytes, more than the {limit} allowed",
                m.name().map(|n| n.to_string()).unwrap_or_default()
            ),
        ));
    }
    let mut out = Vec::with_capacity(declared as usize);
    m.take(limit)
        .read_to_end(&mut out)
        .map_err(|e| bad(path, format!("zip member {index}: {e}")))?;
    Ok(out)
}

/// The contiguous bytes of a tensor view of a storage.
fn gather(path: &Path, name: &str, t: &TensorRef, data: &[u8]) -> Result<Vec<u8>> {
    let es = t.dtype.size() as usize;
    let numel: u64 = t.shape.iter().product();
    // Contiguous row-major strides.
    let mut expected = vec![1u64; t.shape.len()];
    for i in (0..t.shape.len().saturating_sub(1)).rev() {
        expected[i] = expected[i + 1] * t.shape[i + 1].max(1);
    }
    let contiguous = t.stride.len() == t.shape.len()
        && t.shape
            .iter()
            .zip(t.stride.iter().zip(&expected))
            .all(|(&d, (&s, &e))| d <= 1 || s == e);
    if !contiguous {
        return Err(Error::unsupported(
            path,
            format!(
                "`{name}` is a non-contiguous view (stride {:?}); save `.contiguous()` tensors",
                t.stride
            ),
        ));
    }
    let end = t
        .offset
        .checked_add(numel)
        .filter(|&e| e <= t.storage_len)
        .ok_or_else(|| {
            bad(
                path,
                format!(
                    "`{name}`: offset {} + {numel} elements exceed its storage of {}",
                    t.offset, t.storage_len
                ),
            )
        })?;
    Ok(data[t.offset as usize * es..end as usize * es].to_vec())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool => "a bool",
        Value::Int(_) => "an int",
        Value::Float => "a float",
        Value::Str(_) => "a string",
        Value::Bytes => "bytes",
        Value::Tuple(_) => "a tuple",
        Value::List(_) => "a list",
        Value::Dict(_) => "a dict",
        Value::Global(..) => "a global",
        Value::Storage(..) => "a storage",
        Value::Tensor(_) => "a tensor",
        Value::Mark => "a mark",
    }
}

struct Reader<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                bad(
                    self.path,
                    format!("the pickle ends inside an opcode at byte {}", self.pos),
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| bad(self.path, "the pickle ends inside a GLOBAL name"))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| bad(self.path, "a GLOBAL name is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: u64) -> Result<String> {
        if n > self.data.len() as u64 {
            return Err(bad(self.path, "a string longer than the pickle"));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad(self.path, "a pickle string is not UTF-8"))
    }
}

/// Interpret a state-dict pickle without running anything.
fn unpickle(path: &Path, data: &[u8]) -> Result<Value> {
    let mut r = Reader { path, data, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();
    let err = |m: String| bad(path, format!("pickle: {m}"));
    let pop = |stack: &mut Vec<Value>| {
        stack
            .pop()
            .ok_or_else(|| bad(path, "pickle: pop from an empty stack"))
    };
    let pop_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>> {
        let at = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| bad(path, "pickle: no MARK on the stack"))?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    };
    for _ in 0..MAX_OPS {
        let op = r.u8()?;
        if stack.len() > 1_000_000 {
            return Err(err("more than a million values on the stack".into()));
        }
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.u64()?; // FRAME
            }
            b'.' => return pop(&mut stack),
            b'}' => stack.push(Value::Dict(Rc::default())),
            b']' => stack.push(Value::List(Rc::default())),
            b')' => stack.push(Value::Tuple(Rc::new(Vec::new()))),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool),
            0x89 => stack.push(Value::Bool),
            b'J' => {
                let v = r.u32()? as i32;
                stack.push(Value::Int(v as i64))
            }
            b'K' => {
                let v = r.u8()?;
                stack.push(Value::Int(v as i64))
            }
            b'M' => {
                let v = r.u16()?;
                stack.push(Value::Int(v as i64))
            }
            0x8a => {
                let n = r.u8()? as usize;
                let b = r.take(n)?;
                if n > 8 {
                    return Err(err(format!("a {n}-byte integer")));
                }
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                r.take(8)?;
                stack.push(Value::Float);
            }
            b'X' => {
                let n = r.u32()? as u64;
                let s = r.string(n)?;
                stack.push(Value::Str(s));
            }
            0x8c => {
                let n = r.u8()? as u64;
                let s = r.string(n)?;
                stack.push(Value::Str(s));
            }
            0x8d => {
                let n = r.u64()?;
                let s = r.string(n)?;
                stack.push(Value::Str(s));
            }
            b'B' => {
                let n = r.u32()? as usize;
                r.take(n)?;
                stack.push(Value::Bytes);
            }
            b'C' => {
                let n = r.u8()? as usize;
                r.take(n)?;
                stack.push(Value::Bytes);
            }
            b'c' => {
                let module = r.line()?.to_string();
                let name = r.line()?.to_string();
                stack.push(global(path, module, name)?);
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(global(path, m, n)?),
                    _ => return Err(err("STACK_GLOBAL without two strings".into())),
                }
            }
            b'q' => {
                let k = r.u8()? as u64;
                memo.insert(
                    k,
                    stack
                        .last()
                        .cloned()
                        .ok_or_else(|| err("memoise on an empty stack".into()))?,
                );
            }
            b'r' => {
                let k = r.u32()? as u64;
                memo.insert(
                    k,
                    stack
                        .last()
                        .cloned()
                        .ok_or_else(|| err("memoise on an empty stack".into()))?,
                );
            }
            0x94 => {
                let k = memo.len() as u64;
                memo.insert(
                    k,
                    stack
                        .last()
                        .cloned()
                        .ok_or_else(|| err("memoise on an empty stack".into()))?,
                );
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    r.u8()? as u64
                } else {
                    r.u32()? as u64
                };
                // Shared, not copied: containers are reference-counted.
                let v = memo
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| err(format!("memo {k} is not set")))?;
                stack.push(v);
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(err("TUPLE on a short stack".into()));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(Rc::new(items)));
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last() {
                    Some(Value::List(l)) => l.borrow_mut().push(v),
                    _ => return Err(err("APPEND to a non-list".into())),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last() {
                    Some(Value::List(l)) => l.borrow_mut().extend(items),
                    _ => return Err(err("APPENDS to a non-list".into())),
                }
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last() {
                    Some(Value::Dict(d)) => d.borrow_mut().push((k, v)),
                    _ => return Err(err("SETITEM on a non-dict".into())),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                if items.len() % 2 != 0 {
                    return Err(err("SETITEMS with an odd number of values".into()));
                }
                match stack.last() {
                    Some(Value::Dict(d)) => {
                        let mut d = d.borrow_mut();
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => return Err(err("SETITEMS on a non-dict".into())),
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent(path, pid)?);
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(reduce(path, callable, args)?);
            }
            b'b' => {
                // BUILD: state for the object below; an OrderedDict's state (if any) is empty,
                // tensors' state is their (unused) metadata.
                pop(&mut stack)?;
                if stack.is_empty() {
                    return Err(err("BUILD on an empty stack".into()));
                }
            }
            other => {
                return Err(err(format!(
                    "opcode 0x{other:02x} at byte {} is not one torch.save writes for a state dict: refused",
                    r.pos - 1
                )));
            }
        }
        if nesting(stack.last()) > MAX_DEPTH {
            return Err(err(format!("containers nested deeper than {MAX_DEPTH}")));
        }
    }
    Err(err(format!("more than {MAX_OPS} opcodes")))
}

fn nesting(v: Option<&Value>) -> usize {
    match v {
        Some(Value::Tuple(t)) => {
            1 + t
                .iter()
                .map(|x| nesting(Some(x)))
                .max()
                .unwrap_or(0)
                .min(MAX_DEPTH + 1)
        }
        _ => 0,
    }
}

fn global(path: &Path, module: String, name: String) -> Result<Value> {
    if ALLOWED.iter().any(|(m, n)| *m == module && *n == name) {
        Ok(Value::Global(module, name))
    } else {
        Err(Error::unsupported(
            path,
            format!(
                "the pickle asks for `{module}.{name}`, which a state dict never needs: refused \
                 (nothing was executed)"
            ),
        ))
    }
}

fn persistent(path: &Path, pid: Value) -> Result<Value> {
    let err = || bad(path, "pickle: a persistent id that is not a torch storage");
    let Value::Tuple(t) = pid else {
        return Err(err());
    };
    let [
        Value::Str(tag),
        Value::Global(_, class),
        Value::Str(key),
        _,
        Value::Int(numel),
    ] = t.as_slice()
    else {
        return Err(err());
    };
    if tag != "storage" || *numel < 0 {
        return Err(err());
    }
    let dtype = match class.as_str() {
        "FloatStorage" => StorageDtype::F32,
        "HalfStorage" => StorageDtype::F16,
        "BFloat16Storage" => StorageDtype::BF16,
        "DoubleStorage" => StorageDtype::F64,
        "BoolStorage" => StorageDtype::Bool,
        other => {
            return Err(Error::unsupported(
                path,
                format!("pickle: storage type `{other}` is not read"),
            ));
        }
    };
    if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad(
            path,
            format!("pickle: storage key `{key}` is not a plain name"),
        ));
    }
    Ok(Value::Storage(key.clone(), dtype, *numel as u64))
}

fn ints(path: &Path, v: &Value, what: &str) -> Result<Vec<u64>> {
    match v {
        Value::Tuple(t) => t
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as u64),
                _ => Err(bad(
                    path,
                    format!("pickle: tensor {what} holds a non-integer"),
                )),
            })
            .collect(),
        _ => Err(bad(path, format!("pickle: tensor {what} is not a tuple"))),
    }
}

fn reduce(path: &Path, callable: Value, args: Value) -> Result<Value> {
    let Value::Global(module, name) = &callable else {
        return Err(Error::unsupported(
            path,
            format!("pickle: calling {} is refused", kind(&callable)),
        ));
    };
    let Value::Tuple(args) = args else {
        return Err(bad(path, "pickle: call arguments are not a tuple"));
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") if args.is_empty() => Ok(Value::Dict(Rc::default())),
        ("torch._utils", "_rebuild_tensor_v2") if args.len() >= 4 => {
            let Value::Storage(key, dtype, len) = &args[0] else {
                return Err(bad(path, "pickle: a tensor without a storage"));
            };
            let Value::Int(offset) = args[1] else {
                return Err(bad(path, "pickle: a tensor offset that is not an integer"));
            };
            let shape = ints(path, &args[2], "shape")?;
            let stride = ints(path, &args[3], "stride")?;
            if offset < 0 || shape.len() > 8 {
                return Err(bad(
                    path,
                    "pickle: a tensor with a negative offset or more than 8 dimensions",
                ));
            }
            shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n <= *len).ok_or_else(|| {
                bad(path, format!("pickle: a tensor of shape {shape:?} larger than its storage ({len} elements)"))
            })?;
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: key.clone(),
                dtype: *dtype,
                storage_len: *len,
                offset: offset as u64,
                shape,
                stride,
            })))
        }
        ("torch._utils", "_rebuild_parameter") if !args.is_empty() => match &args[0] {
            Value::Tensor(t) => Ok(Value::Tensor(t.clone())),
            _ => Err(bad(path, "pickle: a parameter without a tensor")),
        },
        _ => Err(Error::unsupported(
            path,
            format!("pickle: `{module}.{name}` called with unexpected arguments: refused"),
        )),
    }
}
