//! The primary's indexes, each a type of its own so that a worker's index
//! is never taken for a slot's or a server's: [`WorkerIdx`] (a worker
//! process alive, its place in the event loop's table and its token),
//! [`SlotIdx`] (a place for one worker, from `--workers`), [`ServerIdx`] (a
//! listening address), and [`IndexVec`], a vector indexed by one of them.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Index, IndexMut};

/// An index type of the primary's.
pub(crate) trait Idx: Copy + Eq + fmt::Debug {
    fn new(i: usize) -> Self;
    fn get(self) -> usize;
}

macro_rules! index_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub(crate) struct $name(pub usize);

        impl Idx for $name {
            fn new(i: usize) -> Self {
                $name(i)
            }
            fn get(self) -> usize {
                self.0
            }
        }
    };
}

index_type!(
    /// A worker process alive: its place in the event loop's table (reused
    /// once it is gone) and so its token. Not its id, which is new at every
    /// start.
    WorkerIdx
);
index_type!(
    /// A slot, a place for one worker: slot `SlotIdx(0)` is "slot 1" in
    /// logs and metrics ([`SlotIdx::number`]).
    SlotIdx
);
index_type!(
    /// A server, one listening address.
    ServerIdx
);

impl fmt::Display for WorkerIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ServerIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl SlotIdx {
    /// The slot's number as logs, metrics and `DISTRIBUTOR_SLOT` say it,
    /// from 1.
    pub fn number(self) -> usize {
        self.0 + 1
    }
}

/// A `Vec<T>` indexed by `I`.
pub(crate) struct IndexVec<I, T> {
    items: Vec<T>,
    index: PhantomData<fn(I)>,
}

impl<I: Idx, T> IndexVec<I, T> {
    pub fn new() -> Self {
        IndexVec {
            items: Vec::new(),
            index: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Appends `t`; returns its index.
    pub fn push(&mut self, t: T) -> I {
        self.items.push(t);
        I::new(self.items.len() - 1)
    }

    pub fn get(&self, i: I) -> Option<&T> {
        self.items.get(i.get())
    }

    pub fn get_mut(&mut self, i: I) -> Option<&mut T> {
        self.items.get_mut(i.get())
    }

    /// Every index, in order.
    pub fn indices(&self) -> impl Iterator<Item = I> + use<I, T> {
        (0..self.items.len()).map(I::new)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.items.iter()
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, T> {
        self.items.iter_mut()
    }

    /// `(index, item)` pairs, in order.
    pub fn iter_enumerated(&self) -> impl Iterator<Item = (I, &T)> {
        self.items.iter().enumerate().map(|(i, t)| (I::new(i), t))
    }
}

impl<I: Idx, T> Default for IndexVec<I, T> {
    fn default() -> Self {
        IndexVec::new()
    }
}

impl<I: Idx, T: fmt::Debug> fmt::Debug for IndexVec<I, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.items).finish()
    }
}

impl<I: Idx, T> Index<I> for IndexVec<I, T> {
    type Output = T;
    fn index(&self, i: I) -> &T {
        &self.items[i.get()]
    }
}

impl<I: Idx, T> IndexMut<I> for IndexVec<I, T> {
    fn index_mut(&mut self, i: I) -> &mut T {
        &mut self.items[i.get()]
    }
}

impl<'a, I: Idx, T> IntoIterator for &'a IndexVec<I, T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

impl<'a, I: Idx, T> IntoIterator for &'a mut IndexVec<I, T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_vec_is_indexed_by_its_type_only() {
        let mut v: IndexVec<SlotIdx, &str> = IndexVec::new();
        let a = v.push("a");
        let b = v.push("b");
        assert_eq!((a, b), (SlotIdx(0), SlotIdx(1)));
        v[b] = "B";
        assert_eq!(
            v.iter_enumerated().collect::<Vec<_>>(),
            [(a, &"a"), (b, &"B")]
        );
        assert_eq!(v.indices().collect::<Vec<_>>(), [a, b]);
        assert_eq!(b.number(), 2);
        assert!(v.get(SlotIdx(2)).is_none());
    }
}
