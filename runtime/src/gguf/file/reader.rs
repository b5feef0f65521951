//! The bounds-checked cursor `GgufFile::parse` reads the header with: every
//! read and every count is checked against the bytes that remain, so a corrupt or hostile file
//! yields an [`Error`] naming the file and the key or tensor, never a panic or a huge
//! allocation.

use std::path::Path;

use super::{Value, ValueType, MAX_ARRAY_DEPTH};
use crate::error::{Error, Result};

/// A cursor over the file bytes; every read checks the bounds.
pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
    pub(super) path: &'a Path,
}

impl<'a> Reader<'a> {
    pub(super) fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    pub(super) fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::format(
                self.path,
                format!(
                    "{what}: needs {n} bytes at offset {} but the file has {} bytes; \
                     the file is truncated or corrupt",
                    self.pos,
                    self.buf.len()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    pub(super) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(super) fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        if count.saturating_mul(min_size) > self.remaining() {
            return Err(Error::format(
                self.path,
                format!(
                    "{what} {count} at offset {} cannot fit in the {} remaining bytes; \
                     the file is truncated or corrupt",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(Error::format(
                self.path,
                format!(
                    "{what}: string length {len} at offset {} exceeds the {} remaining bytes; \
                     the file is truncated or corrupt",
                    self.pos - 8,
                    self.remaining()
                ),
            ));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| Error::format(self.path, format!("{what}: string is not UTF-8: {e}")))
    }

    pub(super) fn tensor_err(&self, name: &str, msg: String) -> Error {
        Error::format(self.path, format!("tensor `{name}`: {msg}"))
    }

    pub(super) fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(self.u32(key)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::U64 => Value::U64(self.u64(key)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Bool => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(Error::config(self.path, key, format!("invalid bool byte {b}"))),
            },
            ValueType::String => Value::String(self.string(key)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::config(self.path, key, "arrays nested too deeply"));
                }
                let et = self.u32(key)?;
                let et = ValueType::from_u32(et)
                    .ok_or_else(|| Error::config(self.path, key, format!("unknown array element type {et}")))?;
                let n = self.u64(key)?;
                if n.saturating_mul(et.min_size()) > self.remaining() {
                    return Err(Error::config(
                        self.path,
                        key,
                        format!(
                            "array of {n} {et:?} at offset {} cannot fit in the {} remaining \
                             bytes; the file is truncated or corrupt",
                            self.pos,
                            self.remaining()
                        ),
                    ));
                }
                let mut items = Vec::with_capacity((n as usize).min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(et, key, depth + 1)?);
                }
                Value::Array(et, items)
            }
        })
    }
}
