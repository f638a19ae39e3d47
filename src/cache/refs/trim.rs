//! Which metadata the metadata budget removes (`cache.max_metadata_size`): a plan decided on
//! the reference graph, pure (no IO, no locks; `RefIndex::plan_trim` runs it under the index's
//! lock, on the blocking pool, over copies of the budget's entries).
//!
//! The order keeps what users need longest:
//! 1. manifests that no tag record, link or pin reaches (left behind when a tag moved, or by
//!    an earlier trim), least recently used first; among them a manifest that a cached index
//!    still lists goes only after that index (parents before children), so no manifest an
//!    index references goes while one that nothing references remains;
//! 2. then tag records and links (every record of a tag together), least recently used first,
//!    each with the manifests that only it reached.
//!
//! Never chosen: an entry marked `keep` (a request is reading it), a manifest a pin reaches
//! (digest, repository or tag pins), a tag record or link a pin names, and a manifest that a
//! remaining root still reaches. Blobs are not metadata: the ones only removed manifests
//! referenced become ordinary candidates of the blob budget.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use super::graph::{Graph, RepoKey};
use crate::oci::Digest;
use crate::policy::pins::Pin;

/// A piece of metadata the budget counts, as the reference index names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetaKey {
    Manifest(Digest),
    /// Every record of a tag (one per Accept class), which go together.
    Tag(RepoKey, String),
    Link(RepoKey, Digest),
}

impl MetaKey {
    fn is_root(&self) -> bool {
        !matches!(self, MetaKey::Manifest(_))
    }
}

/// A budget entry, as a pass sees it.
#[derive(Debug, Clone)]
pub struct MetaItem {
    pub key: MetaKey,
    /// Bytes on disk (a tag: all its records).
    pub size: u64,
    /// Last use, milliseconds since the epoch.
    pub last_access: u64,
    /// Being read now: never chosen.
    pub keep: bool,
}

/// What goes together: an unreferenced manifest alone, or a root (tag or link) first and the
/// manifests only it reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimGroup {
    pub keys: Vec<MetaKey>,
    pub bytes: u64,
}

impl Graph {
    /// The groups to remove, in order, until `total` is at `target` or below (or as close as
    /// what may go allows). See the module's comment for the order.
    pub fn plan_trim(
        &self,
        items: &[MetaItem],
        pins: &[Pin],
        total: u64,
        target: u64,
    ) -> Vec<TrimGroup> {
        let mut plan = Vec::new();
        if total <= target {
            return plan;
        }
        let by_key: HashMap<&MetaKey, &MetaItem> = items.iter().map(|i| (&i.key, i)).collect();
        let pinned = self.pinned(pins);
        // How many roots reach each manifest.
        let mut reached: HashMap<Digest, usize> = HashMap::new();
        for (key, roots) in &self.repos {
            let tags = roots
                .tags
                .keys()
                .map(|t| self.root_starts(&MetaKey::Tag(key.clone(), t.clone())));
            let links = roots.links.iter().map(|d| vec![d.clone()]);
            for starts in tags.chain(links) {
                for m in self.closure(starts) {
                    *reached.entry(m).or_default() += 1;
                }
            }
        }
        let mut remaining = total;
        let mut gone: HashSet<Digest> = HashSet::new();

        // 1. Unreferenced manifests, parents before children, least recently used first.
        let unreferenced: HashMap<&Digest, &MetaItem> = items
            .iter()
            .filter_map(|i| match &i.key {
                MetaKey::Manifest(d) if !reached.contains_key(d) && !pinned.contains(d) => {
                    Some((d, i))
                }
                _ => None,
            })
            .collect();
        let children = |d: &Digest| -> Vec<Digest> {
            self.manifests
                .get(d)
                .map(|r| {
                    r.manifests
                        .iter()
                        .filter(|c| *c != d && unreferenced.contains_key(c))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut parents: HashMap<Digest, usize> = HashMap::new();
        for d in unreferenced.keys() {
            for c in children(d) {
                *parents.entry(c).or_default() += 1;
            }
        }
        let mut ready: BinaryHeap<Reverse<(u64, Digest)>> = unreferenced
            .iter()
            .filter(|(d, i)| !i.keep && !parents.contains_key(**d))
            .map(|(d, i)| Reverse((i.last_access, (*d).clone())))
            .collect();
        while remaining > target
            && let Some(Reverse((_, d))) = ready.pop()
        {
            let Some(item) = unreferenced.get(&d) else {
                continue;
            };
            remaining = remaining.saturating_sub(item.size);
            plan.push(TrimGroup {
                keys: vec![item.key.clone()],
                bytes: item.size,
            });
            for c in children(&d) {
                if let Some(n) = parents.get_mut(&c) {
                    *n = n.saturating_sub(1);
                    if *n == 0
                        && let Some(ci) = unreferenced.get(&c)
                        && !ci.keep
                    {
                        ready.push(Reverse((ci.last_access, c.clone())));
                    }
                }
            }
            gone.insert(d);
        }

        // 2. Roots, least recently used first, each with what only it reached.
        let mut roots: Vec<&MetaItem> = items
            .iter()
            .filter(|i| i.key.is_root() && !i.keep && !root_pinned(&i.key, pins))
            .collect();
        roots.sort_by(|a, b| a.last_access.cmp(&b.last_access).then(a.key.cmp(&b.key)));
        for root in roots {
            if remaining <= target {
                break;
            }
            let mut group = TrimGroup {
                keys: vec![root.key.clone()],
                bytes: root.size,
            };
            let mut freed: Vec<Digest> = Vec::new();
            for m in self.closure(self.root_starts(&root.key)) {
                let Some(n) = reached.get_mut(&m) else {
                    continue;
                };
                *n = n.saturating_sub(1);
                if *n == 0 && !pinned.contains(&m) && !gone.contains(&m) {
                    freed.push(m);
                }
            }
            freed.sort();
            for m in freed {
                let key = MetaKey::Manifest(m.clone());
                if let Some(item) = by_key.get(&key)
                    && !item.keep
                {
                    group.bytes += item.size;
                    group.keys.push(key);
                    gone.insert(m);
                }
            }
            remaining = remaining.saturating_sub(group.bytes);
            plan.push(group);
        }
        plan
    }

    /// The manifests a root names (a tag: one per Accept class).
    fn root_starts(&self, key: &MetaKey) -> Vec<Digest> {
        match key {
            MetaKey::Manifest(_) => Vec::new(),
            MetaKey::Tag(repo, tag) => self
                .repos
                .get(repo)
                .and_then(|r| r.tags.get(tag))
                .map(|answers| answers.iter().map(|(_, d)| d.clone()).collect())
                .unwrap_or_default(),
            MetaKey::Link(_, d) => vec![d.clone()],
        }
    }

    /// Takes removed metadata out of the graph: roots, then manifests.
    pub fn remove_trimmed(&mut self, keys: &[MetaKey]) {
        for key in keys {
            match key {
                MetaKey::Manifest(d) => {
                    self.manifests.remove(d);
                }
                MetaKey::Tag(repo, tag) => {
                    if let Some(r) = self.repos.get_mut(repo) {
                        r.tags.remove(tag);
                    }
                }
                MetaKey::Link(repo, d) => {
                    if let Some(r) = self.repos.get_mut(repo) {
                        r.links.remove(d);
                    }
                }
            }
        }
        self.repos
            .retain(|_, r| !r.tags.is_empty() || !r.links.is_empty());
    }
}

/// Does a repository or tag pin name this root? (Digest pins keep manifests, not roots.)
fn root_pinned(key: &MetaKey, pins: &[Pin]) -> bool {
    pins.iter().any(|p| match key {
        MetaKey::Manifest(_) => false,
        MetaKey::Tag(r, t) => p.matches_tag(&r.registry, &r.repository, t),
        MetaKey::Link(r, _) => p.matches_repository(&r.registry, &r.repository),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::references::References;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    fn repo(name: &str) -> RepoKey {
        RepoKey {
            registry: "docker.io".into(),
            repository: name.into(),
        }
    }

    fn manifest(g: &mut Graph, name: &str, children: &[&str]) {
        g.add_manifest(
            d(name),
            References {
                blobs: vec![d(&format!("{name}-layer"))],
                manifests: children.iter().map(|c| d(c)).collect(),
            },
        );
    }

    fn item(key: MetaKey, size: u64, last_access: u64) -> MetaItem {
        MetaItem {
            key,
            size,
            last_access,
            keep: false,
        }
    }

    fn m(name: &str) -> MetaKey {
        MetaKey::Manifest(d(name))
    }

    fn tag(name: &str, t: &str) -> MetaKey {
        MetaKey::Tag(repo(name), t.into())
    }

    /// app:1 → ix → (p1, p2); app:2 → solo; team/c linked → linked; orphan, old-ix → old-p
    /// reached by nothing. Every item 10 bytes; last uses as given.
    fn sample() -> (Graph, Vec<MetaItem>) {
        let mut g = Graph::default();
        manifest(&mut g, "ix", &["p1", "p2"]);
        manifest(&mut g, "p1", &[]);
        manifest(&mut g, "p2", &[]);
        manifest(&mut g, "solo", &[]);
        manifest(&mut g, "linked", &[]);
        manifest(&mut g, "orphan", &[]);
        manifest(&mut g, "old-ix", &["old-p"]);
        manifest(&mut g, "old-p", &[]);
        g.set_tag(repo("app"), "1", "oci", d("ix"));
        g.set_tag(repo("app"), "2", "oci", d("solo"));
        g.add_link(repo("team/c"), d("linked"));
        let items = vec![
            item(m("ix"), 10, 1),
            item(m("p1"), 10, 1),
            item(m("p2"), 10, 1),
            item(m("solo"), 10, 1),
            item(m("linked"), 10, 1),
            // The unreferenced ones are the most recently used, and still go first. The
            // index's child was used before the index: it still goes after it.
            item(m("orphan"), 10, 50),
            item(m("old-p"), 10, 40),
            item(m("old-ix"), 10, 60),
            item(tag("app", "1"), 10, 30),
            item(tag("app", "2"), 10, 10),
            item(MetaKey::Link(repo("team/c"), d("linked")), 10, 20),
        ];
        (g, items)
    }

    fn order(plan: &[TrimGroup]) -> Vec<Vec<MetaKey>> {
        plan.iter().map(|g| g.keys.clone()).collect()
    }

    #[test]
    fn unreferenced_manifests_go_first_parents_before_children() {
        let (g, items) = sample();
        let plan = g.plan_trim(&items, &[], 110, 80);
        assert_eq!(
            order(&plan),
            vec![vec![m("orphan")], vec![m("old-ix")], vec![m("old-p")]]
        );
        assert_eq!(plan.iter().map(|g| g.bytes).sum::<u64>(), 30);
    }

    #[test]
    fn then_the_least_recently_used_roots_with_what_only_they_reached() {
        let (g, items) = sample();
        let plan = g.plan_trim(&items, &[], 110, 40);
        assert_eq!(
            order(&plan),
            vec![
                vec![m("orphan")],
                vec![m("old-ix")],
                vec![m("old-p")],
                vec![tag("app", "2"), m("solo")],
                vec![MetaKey::Link(repo("team/c"), d("linked")), m("linked")],
            ]
        );
        // Under the target after the link: app:1 and its index stay.
        let bytes: u64 = plan.iter().map(|g| g.bytes).sum();
        assert_eq!(bytes, 70);
    }

    #[test]
    fn a_manifest_another_root_still_reaches_stays_with_it() {
        let (mut g, mut items) = sample();
        // app:3 names p1 too: dropping app:1 frees ix and p2, not p1.
        g.set_tag(repo("app"), "3", "oci", d("p1"));
        items.push(item(tag("app", "3"), 10, 100));
        let plan = g.plan_trim(&items, &[], 120, 0);
        let app1 = plan
            .iter()
            .find(|grp| grp.keys.first() == Some(&tag("app", "1")))
            .unwrap();
        let mut freed = app1.keys[1..].to_vec();
        freed.sort();
        let mut want = vec![m("ix"), m("p2")];
        want.sort();
        assert_eq!(freed, want);
        // p1 goes with app:3, the last root.
        assert_eq!(plan.last().unwrap().keys, vec![tag("app", "3"), m("p1")]);
    }

    #[test]
    fn pinned_and_read_items_are_never_chosen() {
        let (g, mut items) = sample();
        for i in &mut items {
            if i.key == m("orphan") {
                i.keep = true; // being read
            }
        }
        let pins = vec![
            Pin::parse("docker.io/app:1").unwrap(),
            Pin::parse(&d("old-p").to_string()).unwrap(),
        ];
        let plan = g.plan_trim(&items, &pins, 110, 0);
        let chosen: Vec<MetaKey> = plan.iter().flat_map(|g| g.keys.clone()).collect();
        for kept in [m("orphan"), m("old-p"), tag("app", "1"), m("ix"), m("p1")] {
            assert!(!chosen.contains(&kept), "{kept:?} chosen: {chosen:?}");
        }
        assert!(chosen.contains(&m("old-ix")));
        assert!(chosen.contains(&tag("app", "2")));
    }

    #[test]
    fn nothing_under_the_target_and_removal_keeps_the_graph_consistent() {
        let (mut g, items) = sample();
        assert!(g.plan_trim(&items, &[], 110, 110).is_empty());
        let plan = g.plan_trim(&items, &[], 110, 0);
        assert_eq!(plan.iter().map(|g| g.bytes).sum::<u64>(), 110);
        for grp in &plan {
            g.remove_trimmed(&grp.keys);
        }
        assert_eq!(g.manifest_count(), 0);
        assert_eq!(g.root_counts(), (0, 0));
    }
}
