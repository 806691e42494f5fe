//! The prefix trie of the DocIDs that exist: what constrained decoding may generate.
//!
//! Layout (after the STATIC decoder's idea of dense masks near the root, sparse lists below):
//! nodes at depth < [`DENSE_DEPTHS`] keep a dense child table of `codebook_size` slots (the root
//! and the first level fan out to most codes); deeper nodes keep a code-sorted list of
//! `(code, child)` pairs (a few children each). Every node counts the DocIDs below it; removing
//! a DocID prunes the nodes left empty and recycles their slots, so the trie follows products
//! getting and losing DocIDs incrementally.

use std::collections::HashMap;
use std::sync::Arc;

use crate::docid::DocId;

/// Depths whose nodes keep a dense child table.
pub const DENSE_DEPTHS: usize = 2;

/// A node index (0 is the root).
pub type NodeId = u32;

const NO_CHILD: NodeId = NodeId::MAX;

/// Errors changing the trie.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrieError {
    /// The DocID has another length than the trie's levels, or a code outside the codebook.
    #[error("DocID {docid:?} does not fit {levels} levels of {codebook_size} codes")]
    Shape {
        /// The offending DocID.
        docid: Vec<u8>,
        /// Levels of the trie.
        levels: usize,
        /// Codes per level.
        codebook_size: usize,
    },
    /// The DocID is already held by a product.
    #[error("DocID {docid:?} is already held by {holder}")]
    Taken {
        /// The DocID.
        docid: Vec<u8>,
        /// The product holding it.
        holder: String,
    },
}

#[derive(Debug, Clone)]
enum Children {
    Dense(Vec<NodeId>),
    Sparse(Vec<(u8, NodeId)>),
}

#[derive(Debug, Clone)]
struct Node {
    children: Children,
    /// DocIDs below (a leaf: 1).
    live: u32,
}

/// The DocIDs that exist, as a prefix trie, with the product holding each.
#[derive(Debug, Clone)]
pub struct DocIdTrie {
    levels: usize,
    codebook_size: usize,
    nodes: Vec<Node>,
    free: Vec<NodeId>,
    products: HashMap<NodeId, Arc<str>>,
}

impl DocIdTrie {
    /// An empty trie for DocIDs of `levels` codes below `codebook_size` (at most 256).
    pub fn new(levels: usize, codebook_size: usize) -> Self {
        debug_assert!(levels >= 1 && (1..=256).contains(&codebook_size));
        let mut trie = Self { levels, codebook_size, nodes: Vec::new(), free: Vec::new(), products: HashMap::new() };
        trie.allocate(0);
        trie
    }

    /// A trie holding every `(product, DocID)` pair.
    pub fn from_pairs<'a>(levels: usize, codebook_size: usize, pairs: impl IntoIterator<Item = (&'a str, &'a DocId)>) -> Result<Self, TrieError> {
        let mut trie = Self::new(levels, codebook_size);
        for (product_id, docid) in pairs {
            trie.insert(docid, product_id)?;
        }
        Ok(trie)
    }

    /// Levels (DocID length).
    pub fn levels(&self) -> usize {
        self.levels
    }

    /// Codes per level.
    pub fn codebook_size(&self) -> usize {
        self.codebook_size
    }

    /// DocIDs held.
    pub fn len(&self) -> usize {
        self.nodes[0].live as usize
    }

    /// Whether no DocID is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The root node, where decoding starts.
    pub fn root(&self) -> NodeId {
        0
    }

    /// Adds `docid` for `product_id`. Fails when the DocID does not fit the trie or is held.
    pub fn insert(&mut self, docid: &DocId, product_id: &str) -> Result<(), TrieError> {
        self.check_shape(docid)?;
        if let Some(holder) = self.product_of(docid) {
            return Err(TrieError::Taken { docid: docid.0.clone(), holder: holder.to_owned() });
        }
        let mut node = self.root();
        let mut path = Vec::with_capacity(self.levels + 1);
        path.push(node);
        for (depth, &code) in docid.0.iter().enumerate() {
            node = match self.child(node, code) {
                Some(child) => child,
                None => {
                    let child = self.allocate(depth + 1);
                    self.set_child(node, code, child);
                    child
                }
            };
            path.push(node);
        }
        for visited in path {
            self.nodes[visited as usize].live += 1;
        }
        self.products.insert(node, Arc::from(product_id));
        Ok(())
    }

    /// Removes `docid`; returns the product that held it (none: it was not held). Nodes left
    /// without DocIDs are pruned, so decoding never reaches them.
    pub fn remove(&mut self, docid: &DocId) -> Option<Arc<str>> {
        if self.check_shape(docid).is_err() {
            return None;
        }
        let mut path = vec![(self.root(), 0u8)];
        let mut node = self.root();
        for &code in &docid.0 {
            node = self.child(node, code)?;
            path.push((node, code));
        }
        let product = self.products.remove(&node)?;
        // Walk back up: decrement, and unlink every node that became empty from its parent.
        for index in (0..path.len()).rev() {
            let (visited, code) = path[index];
            self.nodes[visited as usize].live -= 1;
            if index > 0 && self.nodes[visited as usize].live == 0 {
                self.unset_child(path[index - 1].0, code);
                self.free.push(visited);
            }
        }
        debug_assert_eq!(self.products.len(), self.len());
        Some(product)
    }

    /// The product holding `docid`, if any.
    pub fn product_of(&self, docid: &DocId) -> Option<&str> {
        let mut node = self.root();
        for &code in &docid.0 {
            node = self.child(node, code)?;
        }
        self.products.get(&node).map(|product| &**product)
    }

    /// The product at leaf `node` (a node at depth `levels`).
    pub fn product_at(&self, node: NodeId) -> Option<&Arc<str>> {
        self.products.get(&node)
    }

    /// The child of `node` under `code`, if that prefix exists.
    pub fn child(&self, node: NodeId, code: u8) -> Option<NodeId> {
        match &self.nodes[node as usize].children {
            Children::Dense(table) => table.get(code as usize).copied().filter(|child| *child != NO_CHILD),
            Children::Sparse(list) => list.binary_search_by_key(&code, |(child_code, _)| *child_code).ok().map(|index| list[index].1),
        }
    }

    /// Calls `visit(code, child)` for every allowed next code after `node`, in code order.
    pub fn for_each_child(&self, node: NodeId, mut visit: impl FnMut(u8, NodeId)) {
        match &self.nodes[node as usize].children {
            Children::Dense(table) => {
                for (code, &child) in table.iter().enumerate() {
                    if child != NO_CHILD {
                        visit(code as u8, child);
                    }
                }
            }
            Children::Sparse(list) => {
                for &(code, child) in list {
                    visit(code, child);
                }
            }
        }
    }

    fn check_shape(&self, docid: &DocId) -> Result<(), TrieError> {
        if docid.0.len() == self.levels && docid.0.iter().all(|code| (*code as usize) < self.codebook_size) {
            return Ok(());
        }
        Err(TrieError::Shape { docid: docid.0.clone(), levels: self.levels, codebook_size: self.codebook_size })
    }

    fn allocate(&mut self, depth: usize) -> NodeId {
        let children = if depth < DENSE_DEPTHS.min(self.levels) { Children::Dense(vec![NO_CHILD; self.codebook_size]) } else { Children::Sparse(Vec::new()) };
        let node = Node { children, live: 0 };
        match self.free.pop() {
            Some(slot) => {
                self.nodes[slot as usize] = node;
                slot
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as NodeId
            }
        }
    }

    fn set_child(&mut self, node: NodeId, code: u8, child: NodeId) {
        match &mut self.nodes[node as usize].children {
            Children::Dense(table) => table[code as usize] = child,
            Children::Sparse(list) => {
                let index = list.binary_search_by_key(&code, |(child_code, _)| *child_code).unwrap_or_else(|index| index);
                list.insert(index, (code, child));
            }
        }
    }

    fn unset_child(&mut self, node: NodeId, code: u8) {
        match &mut self.nodes[node as usize].children {
            Children::Dense(table) => table[code as usize] = NO_CHILD,
            Children::Sparse(list) => {
                if let Ok(index) = list.binary_search_by_key(&code, |(child_code, _)| *child_code) {
                    list.remove(index);
                }
            }
        }
    }
}
