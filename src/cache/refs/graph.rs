//! The reference graph and the decisions made on it: reachability, the pinned set and purge
//! plans. Pure: no IO, no locks; `RefIndex` keeps one behind a lock and feeds it from disk.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::oci::Digest;
use crate::oci::references::References;
use crate::policy::pins::Pin;

/// A repository on a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoKey {
    pub registry: String,
    pub repository: String,
}

impl std::fmt::Display for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)
    }
}

/// What a purge names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every tag of the repository and every manifest linked to it.
    Repository(RepoKey),
    /// One tag (all its Accept classes).
    Tag(RepoKey, String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Repository(k) => k.fmt(f),
            Target::Tag(k, t) => write!(f, "{k}:{t}"),
        }
    }
}

/// One tag's answers: (Accept class key, manifest) for each class asked, a handful at most.
/// A list, not a map: a map allocates a node of eleven slots for the one or two answers a tag
/// has, and with a hundred thousand tags that was most of the index's memory. The class keys
/// are shared (`Graph::classes`): there are only a few.
type Answers = Vec<(Arc<str>, Digest)>;

#[derive(Debug, Default, Clone)]
pub(super) struct Roots {
    /// tag → its answers (one tag may name different manifests per class).
    pub(super) tags: BTreeMap<String, Answers>,
    /// Manifests pulled by digest that no tag reached at the time.
    pub(super) links: BTreeSet<Digest>,
}

/// The reference graph. Pure. (`trim` plans the metadata budget's removals on it.)
#[derive(Debug, Default, Clone)]
pub struct Graph {
    pub(super) manifests: HashMap<Digest, References>,
    pub(super) repos: BTreeMap<RepoKey, Roots>,
    /// The Accept class keys seen, each stored once.
    classes: HashSet<Arc<str>>,
}

/// What is pinned: blobs and manifests reached from pins, and digest globs checked one by one.
#[derive(Debug, Default)]
pub struct Pinned {
    pub blobs: HashSet<Digest>,
    pub manifests: HashSet<Digest>,
    globs: Vec<Pin>,
}

impl Pinned {
    /// Is this blob (or manifest) pinned?
    pub fn contains(&self, digest: &Digest) -> bool {
        self.blobs.contains(digest)
            || self.manifests.contains(digest)
            || self.globs.iter().any(|p| p.matches_digest(digest))
    }
}

/// What a purge will do, decided on the index before any file is touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgePlan {
    /// Tags whose records go.
    pub tags: Vec<(RepoKey, String)>,
    /// Links that go.
    pub links: Vec<(RepoKey, Digest)>,
    pub remove_manifests: Vec<Digest>,
    /// Reached from the purged roots, but still used elsewhere (or pinned).
    pub keep_manifests: Vec<Digest>,
    pub remove_blobs: Vec<Digest>,
    pub keep_blobs: Vec<Digest>,
}

impl PurgePlan {
    /// Does the target name anything at all?
    pub fn found(&self) -> bool {
        !self.tags.is_empty() || !self.links.is_empty()
    }
}

/// References without the spare capacity their parsing left: the index keeps one per stored
/// manifest for as long as the process runs.
fn compact(mut refs: References) -> References {
    refs.blobs.shrink_to_fit();
    refs.manifests.shrink_to_fit();
    refs
}

impl Graph {
    /// Records a stored manifest's references. True if it is new to the index.
    pub fn add_manifest(&mut self, digest: Digest, refs: References) -> bool {
        self.manifests.insert(digest, compact(refs)).is_none()
    }

    /// Records a manifest the start-up load read, unless it is indexed already (stored while
    /// the load ran: the same digest has the same references). True if it was added.
    pub fn add_manifest_if_absent(&mut self, digest: Digest, refs: References) -> bool {
        match self.manifests.entry(digest) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(compact(refs));
                true
            }
        }
    }

    /// Records a tag answer the start-up load read, unless one was recorded for that tag and
    /// Accept class while the load ran: that one is newer than the file the load read. True
    /// if it was added.
    pub fn set_tag_if_absent(
        &mut self,
        key: RepoKey,
        tag: &str,
        accept: &str,
        digest: Digest,
    ) -> bool {
        self.put_answer(key, tag, accept, digest, false)
    }

    /// Records what a tag resolved to for an Accept class. True if that changed anything.
    pub fn set_tag(&mut self, key: RepoKey, tag: &str, accept: &str, digest: Digest) -> bool {
        self.put_answer(key, tag, accept, digest, true)
    }

    /// The shared copy of an Accept class key.
    fn class(&mut self, accept: &str) -> Arc<str> {
        if let Some(c) = self.classes.get(accept) {
            return c.clone();
        }
        let c: Arc<str> = Arc::from(accept);
        self.classes.insert(c.clone());
        c
    }

    /// Gives a tag an answer for a class, or (`replace`) a new one. True if that changed
    /// anything.
    fn put_answer(
        &mut self,
        key: RepoKey,
        tag: &str,
        accept: &str,
        digest: Digest,
        replace: bool,
    ) -> bool {
        let class = self.class(accept);
        let answers = self
            .repos
            .entry(key)
            .or_default()
            .tags
            .entry(tag.to_string())
            .or_default();
        match answers.iter_mut().find(|(c, _)| **c == *accept) {
            Some((_, d)) if replace && *d != digest => {
                *d = digest;
                true
            }
            Some(_) => false,
            None => {
                answers.push((class, digest));
                true
            }
        }
    }

    /// Records a link. True if it is new.
    pub fn add_link(&mut self, key: RepoKey, digest: Digest) -> bool {
        self.repos.entry(key).or_default().links.insert(digest)
    }

    /// Should a manifest pulled from `key` by digest be linked to it? Only if neither a link
    /// nor one of the repository's tags reaches it already.
    pub fn needs_link(&self, key: &RepoKey, digest: &Digest) -> bool {
        let Some(roots) = self.repos.get(key) else {
            return true;
        };
        if roots.links.contains(digest) {
            return false;
        }
        let starts = roots
            .tags
            .values()
            .flat_map(|a| a.iter().map(|(_, d)| d))
            .cloned();
        !self.reaches(starts, digest)
    }

    /// Is `target` reachable from `starts`? Stops at the first sighting: this runs on every
    /// manifest served by digest.
    fn reaches(&self, starts: impl IntoIterator<Item = Digest>, target: &Digest) -> bool {
        let mut seen = HashSet::new();
        let mut stack: Vec<Digest> = starts.into_iter().collect();
        if stack.contains(target) {
            return true;
        }
        while let Some(d) = stack.pop() {
            if let Some(refs) = self.manifests.get(&d) {
                for c in &refs.manifests {
                    if c == target {
                        return true;
                    }
                    if !seen.contains(c) {
                        stack.push(c.clone());
                    }
                }
            }
            seen.insert(d);
        }
        false
    }

    pub fn manifest_count(&self) -> usize {
        self.manifests.len()
    }

    /// (tags, links) across all repositories.
    pub fn root_counts(&self) -> (usize, usize) {
        self.repos
            .values()
            .fold((0, 0), |(t, l), r| (t + r.tags.len(), l + r.links.len()))
    }

    /// Every manifest digest reachable from `starts` (the starts included, whether or not
    /// they are stored).
    pub(super) fn closure(&self, starts: impl IntoIterator<Item = Digest>) -> HashSet<Digest> {
        let mut seen = HashSet::new();
        let mut stack: Vec<Digest> = starts.into_iter().collect();
        while let Some(d) = stack.pop() {
            if let Some(refs) = self.manifests.get(&d) {
                stack.extend(
                    refs.manifests
                        .iter()
                        .filter(|c| !seen.contains(*c))
                        .cloned(),
                );
            }
            seen.insert(d);
        }
        seen
    }

    /// The roots, with each one's repository and tag (`None`: a link), except those `skip`
    /// names.
    fn roots<'a>(
        &'a self,
        skip: Option<&'a Target>,
    ) -> impl Iterator<Item = (&'a RepoKey, Option<&'a str>, &'a Digest)> + 'a {
        self.repos.iter().flat_map(move |(key, roots)| {
            let repo_skipped = matches!(skip, Some(Target::Repository(k)) if k == key);
            let tags = roots
                .tags
                .iter()
                .filter(move |(tag, _)| {
                    !repo_skipped
                        && !matches!(skip, Some(Target::Tag(k, t)) if k == key && t == *tag)
                })
                .flat_map(move |(tag, answers)| {
                    answers
                        .iter()
                        .map(move |(_, d)| (key, Some(tag.as_str()), d))
                });
            let links = roots
                .links
                .iter()
                .filter(move |_| !repo_skipped)
                .map(move |d| (key, None, d));
            tags.chain(links)
        })
    }

    /// Manifests and blobs the pins reach, over the roots that remain once `skip` is gone.
    fn pinned_without(&self, pins: &[Pin], skip: Option<&Target>) -> Pinned {
        let mut out = Pinned::default();
        if pins.is_empty() {
            return out;
        }
        let mut starts = Vec::new();
        for p in pins {
            match p {
                Pin::Digest(_) => match p.exact_digest() {
                    Some(d) => {
                        out.blobs.insert(d.clone());
                        starts.push(d);
                    }
                    None => {
                        starts.extend(
                            self.manifests
                                .keys()
                                .filter(|d| p.matches_digest(d))
                                .cloned(),
                        );
                        out.globs.push(p.clone());
                    }
                },
                Pin::Repo { .. } => {}
            }
        }
        if pins.iter().any(|p| matches!(p, Pin::Repo { .. })) {
            for (key, tag, d) in self.roots(skip) {
                let hit = pins.iter().any(|p| match tag {
                    Some(t) => p.matches_tag(&key.registry, &key.repository, t),
                    None => p.matches_repository(&key.registry, &key.repository),
                });
                if hit {
                    starts.push(d.clone());
                }
            }
        }
        for m in self.closure(starts) {
            if let Some(refs) = self.manifests.get(&m) {
                out.blobs.extend(refs.blobs.iter().cloned());
            }
            out.manifests.insert(m);
        }
        out
    }

    /// What the pins cover now. Computed once per eviction pass, never per blob.
    pub fn pinned(&self, pins: &[Pin]) -> Pinned {
        self.pinned_without(pins, None)
    }

    /// Decides a purge (see `cache::refs`'s invariants). Pure: nothing changes until
    /// [`Graph::apply`] and the file removals.
    pub fn plan_purge(&self, target: &Target, pins: &[Pin]) -> PurgePlan {
        let mut plan = PurgePlan::default();
        let (key, only_tag) = match target {
            Target::Repository(k) => (k, None),
            Target::Tag(k, t) => (k, Some(t.as_str())),
        };
        let Some(roots) = self.repos.get(key) else {
            return plan;
        };
        let mut starts = Vec::new();
        for (tag, answers) in &roots.tags {
            if only_tag.is_none_or(|t| t == tag) {
                plan.tags.push((key.clone(), tag.clone()));
                starts.extend(answers.iter().map(|(_, d)| d.clone()));
            }
        }
        if only_tag.is_none() {
            for d in &roots.links {
                plan.links.push((key.clone(), d.clone()));
                starts.push(d.clone());
            }
        }
        let candidates = self.closure(starts);
        let pinned = self.pinned_without(pins, Some(target));
        let mut live_starts: Vec<Digest> = self
            .roots(Some(target))
            .map(|(_, _, d)| d.clone())
            .collect();
        live_starts.extend(pinned.manifests.iter().cloned());
        let live = self.closure(live_starts);

        let mut removed = HashSet::new();
        let mut candidate_blobs = BTreeSet::new();
        for d in &candidates {
            let Some(refs) = self.manifests.get(d) else {
                continue; // not stored: nothing to remove
            };
            candidate_blobs.extend(refs.blobs.iter().cloned());
            if live.contains(d) || pinned.contains(d) {
                plan.keep_manifests.push(d.clone());
            } else {
                plan.remove_manifests.push(d.clone());
                removed.insert(d.clone());
            }
        }
        // Blobs any remaining manifest references (reachable or not) stay.
        let used: HashSet<&Digest> = self
            .manifests
            .iter()
            .filter(|(d, _)| !removed.contains(*d))
            .flat_map(|(_, r)| r.blobs.iter())
            .collect();
        for b in candidate_blobs {
            if used.contains(&b) || pinned.contains(&b) {
                plan.keep_blobs.push(b);
            } else {
                plan.remove_blobs.push(b);
            }
        }
        plan.remove_manifests.sort();
        plan.keep_manifests.sort();
        plan
    }

    /// Takes a carried-out purge's roots and manifests out of the index.
    pub fn apply(&mut self, plan: &PurgePlan) {
        for (key, tag) in &plan.tags {
            if let Some(r) = self.repos.get_mut(key) {
                r.tags.remove(tag);
            }
        }
        for (key, d) in &plan.links {
            if let Some(r) = self.repos.get_mut(key) {
                r.links.remove(d);
            }
        }
        self.repos
            .retain(|_, r| !r.tags.is_empty() || !r.links.is_empty());
        for d in &plan.remove_manifests {
            self.manifests.remove(d);
        }
    }

    /// Forgets a manifest (purged by digest).
    pub fn remove_manifest(&mut self, digest: &Digest) {
        self.manifests.remove(digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    fn key(repo: &str) -> RepoKey {
        RepoKey {
            registry: "docker.io".into(),
            repository: repo.into(),
        }
    }

    fn image(g: &mut Graph, name: &str, blobs: &[&str]) {
        g.add_manifest(
            d(name),
            References {
                blobs: blobs.iter().map(|b| d(b)).collect(),
                manifests: vec![],
            },
        );
    }

    fn index(g: &mut Graph, name: &str, children: &[&str]) {
        g.add_manifest(
            d(name),
            References {
                blobs: vec![],
                manifests: children.iter().map(|c| d(c)).collect(),
            },
        );
    }

    fn pins(list: &[&str]) -> Vec<Pin> {
        list.iter().map(|p| Pin::parse(p).unwrap()).collect()
    }

    /// library/a:1 → index ix → (img1: base, a1), (img2: base, a2)
    /// library/b:1 → imgb: base, b1
    /// team/c linked by digest → imgc: c1
    fn sample() -> Graph {
        let mut g = Graph::default();
        index(&mut g, "ix", &["img1", "img2"]);
        image(&mut g, "img1", &["base", "a1"]);
        image(&mut g, "img2", &["base", "a2"]);
        image(&mut g, "imgb", &["base", "b1"]);
        image(&mut g, "imgc", &["c1"]);
        g.set_tag(key("library/a"), "1", "oci", d("ix"));
        g.set_tag(key("library/b"), "1", "oci", d("imgb"));
        g.add_link(key("team/c"), d("imgc"));
        g
    }

    fn names(v: &[Digest], all: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = all
            .iter()
            .filter(|n| v.contains(&d(n)))
            .map(|n| n.to_string())
            .collect();
        out.sort();
        assert_eq!(out.len(), v.len(), "unexpected digests in {v:?}");
        out
    }

    const ALL: &[&str] = &[
        "ix", "img1", "img2", "imgb", "imgc", "base", "a1", "a2", "b1", "c1",
    ];

    #[test]
    fn purging_a_tag_removes_what_only_it_reached() {
        let g = sample();
        let plan = g.plan_purge(&Target::Tag(key("library/a"), "1".into()), &[]);
        assert_eq!(plan.tags, vec![(key("library/a"), "1".to_string())]);
        assert_eq!(names(&plan.remove_manifests, ALL), ["img1", "img2", "ix"]);
        assert!(plan.keep_manifests.is_empty());
        assert_eq!(names(&plan.remove_blobs, ALL), ["a1", "a2"]);
        assert_eq!(
            names(&plan.keep_blobs, ALL),
            ["base"],
            "library/b uses base"
        );
    }

    #[test]
    fn shared_manifests_and_pins_are_kept() {
        let mut g = sample();
        // library/b:2 names one of a's platform images too.
        g.set_tag(key("library/b"), "2", "oci", d("img1"));
        let plan = g.plan_purge(&Target::Repository(key("library/a")), &[]);
        assert_eq!(names(&plan.remove_manifests, ALL), ["img2", "ix"]);
        assert_eq!(names(&plan.keep_manifests, ALL), ["img1"]);
        assert_eq!(names(&plan.remove_blobs, ALL), ["a2"]);

        // A digest pin on a blob keeps it; a pin on a manifest keeps it and its blobs.
        let plan = g.plan_purge(
            &Target::Repository(key("library/a")),
            &pins(&[&d("a2").to_string()]),
        );
        assert!(plan.remove_blobs.is_empty(), "{plan:?}");
        let plan = g.plan_purge(
            &Target::Repository(key("library/a")),
            &pins(&[&d("img2").to_string()]),
        );
        assert_eq!(names(&plan.remove_manifests, ALL), ["ix"]);
        assert!(plan.remove_blobs.is_empty());
    }

    #[test]
    fn a_repository_purge_takes_its_links_and_a_pin_on_the_purged_roots_does_not_hold() {
        let g = sample();
        let target = Target::Repository(key("team/c"));
        let plan = g.plan_purge(&target, &pins(&["docker.io/team/*"]));
        assert_eq!(plan.links, vec![(key("team/c"), d("imgc"))]);
        assert_eq!(names(&plan.remove_manifests, ALL), ["imgc"]);
        assert_eq!(names(&plan.remove_blobs, ALL), ["c1"]);

        let mut g = g;
        g.apply(&plan);
        assert_eq!(g.root_counts(), (2, 0));
        assert!(!g.manifests.contains_key(&d("imgc")));
        // Nothing to purge any more.
        assert!(!g.plan_purge(&target, &[]).found());
    }

    #[test]
    fn pins_reach_through_indexes_to_layers() {
        let g = sample();
        let p = g.pinned(&pins(&["docker.io/library/a:*"]));
        for n in ["ix", "img1", "img2"] {
            assert!(p.manifests.contains(&d(n)), "{n}");
        }
        for n in ["base", "a1", "a2"] {
            assert!(p.contains(&d(n)), "{n}");
        }
        assert!(!p.contains(&d("b1")));
        assert!(!p.contains(&d("c1")), "a tag pattern does not pin links");
        assert!(g.pinned(&pins(&["docker.io/team/c"])).contains(&d("c1")));
        assert!(
            !g.pinned(&pins(&["docker.io/library/a:2"]))
                .contains(&d("a1"))
        );
        // A digest glob pins the blobs it matches, and what the manifests it matches reach.
        let glob = format!("{}*", &d("img1").to_string()[..20]);
        let p = g.pinned(&pins(&[&glob]));
        assert!(p.contains(&d("a1")) && p.contains(&d("img1")) && !p.contains(&d("a2")));
        assert!(g.pinned(&[]).blobs.is_empty());
    }

    #[test]
    fn links_only_for_what_no_tag_reaches() {
        let mut g = sample();
        assert!(!g.needs_link(&key("library/a"), &d("ix")));
        assert!(
            !g.needs_link(&key("library/a"), &d("img2")),
            "child of the tag"
        );
        assert!(g.needs_link(&key("library/a"), &d("imgb")));
        assert!(g.needs_link(&key("other/x"), &d("imgb")));
        assert!(!g.needs_link(&key("team/c"), &d("imgc")));
        // Retagging to the same digest changes nothing; to another does.
        assert!(!g.set_tag(key("library/a"), "1", "oci", d("ix")));
        assert!(g.set_tag(key("library/a"), "1", "oci", d("img1")));
        assert!(g.needs_link(&key("library/a"), &d("img2")));
    }

    #[test]
    fn what_the_load_reads_never_overrides_a_live_record() {
        let mut g = sample();
        // A live answer for library/a:1 names imgb; the load read an older record naming ix.
        assert!(g.set_tag(key("library/a"), "1", "oci", d("imgb")));
        assert!(!g.set_tag_if_absent(key("library/a"), "1", "oci", d("ix")));
        // Another class of the same tag, and another tag, are the load's to fill.
        assert!(g.set_tag_if_absent(key("library/a"), "1", "docker", d("ix")));
        assert!(g.set_tag_if_absent(key("library/a"), "2", "oci", d("ix")));
        assert_eq!(g.root_counts(), (3, 1), "tags a:1, a:2, b:1; one link");
        let plan = g.plan_purge(&Target::Tag(key("library/a"), "1".into()), &[]);
        assert!(plan.keep_manifests.contains(&d("ix")), "a:2 still names ix");
        // A manifest stored live is not replaced by the load's copy (nor counted twice).
        assert!(!g.add_manifest_if_absent(d("imgb"), References::default()));
        assert_eq!(g.manifest_count(), 5);
        assert!(g.pinned(&pins(&["docker.io/library/b"])).contains(&d("b1")));
        assert!(g.add_manifest_if_absent(d("new"), References::default()));
    }

    #[test]
    fn a_cycle_does_not_hang() {
        let mut g = Graph::default();
        index(&mut g, "x", &["y"]);
        index(&mut g, "y", &["x"]);
        g.set_tag(key("r"), "t", "", d("x"));
        let plan = g.plan_purge(&Target::Tag(key("r"), "t".into()), &[]);
        assert_eq!(plan.remove_manifests.len(), 2);
    }
}
