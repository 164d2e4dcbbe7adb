//! A protobuf wire-format reader, so that the receivers decode what they get
//! by field numbers from the published .proto files, independently of the
//! sender's message types.
use std::collections::BTreeMap;

/// A field's value as the wire encodes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Varint(u64),
    Fixed64(u64),
    Bytes(Vec<u8>),
    Fixed32(u32),
}

/// A decoded message: every value of every field number, in order.
#[derive(Clone, Debug, Default)]
pub struct Message(BTreeMap<u32, Vec<Value>>);

fn varint(data: &[u8], at: &mut usize) -> u64 {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = data[*at];
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
    }
    panic!("varint longer than 10 bytes");
}

impl Message {
    /// Decodes `data`, panicking on malformed input (a test failure).
    pub fn decode(data: &[u8]) -> Self {
        let mut fields: BTreeMap<u32, Vec<Value>> = BTreeMap::new();
        let mut at = 0;
        while at < data.len() {
            let key = varint(data, &mut at);
            let (field, wire_type) = ((key >> 3) as u32, key & 7);
            let value = match wire_type {
                0 => Value::Varint(varint(data, &mut at)),
                1 => {
                    at += 8;
                    Value::Fixed64(u64::from_le_bytes(data[at - 8..at].try_into().unwrap()))
                }
                2 => {
                    let len = varint(data, &mut at) as usize;
                    at += len;
                    Value::Bytes(data[at - len..at].to_vec())
                }
                5 => {
                    at += 4;
                    Value::Fixed32(u32::from_le_bytes(data[at - 4..at].try_into().unwrap()))
                }
                other => panic!("wire type {other} at byte {at}"),
            };
            fields.entry(field).or_default().push(value);
        }
        Self(fields)
    }

    fn values(&self, field: u32) -> &[Value] {
        self.0.get(&field).map_or(&[], Vec::as_slice)
    }

    /// The embedded messages of field `field`.
    pub fn messages(&self, field: u32) -> Vec<Message> {
        self.bytes_all(field)
            .iter()
            .map(|b| Self::decode(b))
            .collect()
    }

    pub fn message(&self, field: u32) -> Message {
        let mut all = self.messages(field);
        assert!(all.len() <= 1, "field {field} repeated");
        all.pop().unwrap_or_default()
    }

    pub fn bytes_all(&self, field: u32) -> Vec<Vec<u8>> {
        self.values(field)
            .iter()
            .map(|v| match v {
                Value::Bytes(b) => b.clone(),
                other => panic!("field {field} is {other:?}, not length-delimited"),
            })
            .collect()
    }

    pub fn bytes(&self, field: u32) -> Vec<u8> {
        self.bytes_all(field).pop().unwrap_or_default()
    }

    pub fn string(&self, field: u32) -> String {
        String::from_utf8(self.bytes(field)).expect("a string field holds UTF-8")
    }

    pub fn strings(&self, field: u32) -> Vec<String> {
        self.bytes_all(field)
            .into_iter()
            .map(|b| String::from_utf8(b).expect("UTF-8"))
            .collect()
    }

    /// A scalar varint field (0 when absent, as proto3 defaults).
    pub fn varint(&self, field: u32) -> u64 {
        match self.values(field).last() {
            None => 0,
            Some(Value::Varint(v)) => *v,
            Some(other) => panic!("field {field} is {other:?}, not a varint"),
        }
    }

    /// A repeated varint field, packed or not.
    pub fn varints(&self, field: u32) -> Vec<u64> {
        let mut out = Vec::new();
        for v in self.values(field) {
            match v {
                Value::Varint(v) => out.push(*v),
                Value::Bytes(packed) => {
                    let mut at = 0;
                    while at < packed.len() {
                        out.push(varint(packed, &mut at));
                    }
                }
                other => panic!("field {field} is {other:?}"),
            }
        }
        out
    }
}
