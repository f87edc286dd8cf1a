//! The plan being edited in the layer table: one row per linear module, each holding the plan [`Rule`] fields that
//! apply to it. Rows are the editing model because the table edits modules one by one (or many selected at once);
//! a preset's pattern rules are expanded into rows on load, and rows are folded back into a small plan on save.
//! Every edit re-resolves the plan through the same code the CLI uses, so the average bits, the size and any
//! error the table shows are exactly what `whittle compress --plan` would report.

use crate::cli::plan_args;
use std::path::{Path, PathBuf};
use whittle_core::model::LoadedModel;
use whittle_core::plan::{Matcher, Plan, ResolvedPlan, Rule};

pub struct Row {
    /// Full module name, e.g. `model.layers.3.mlp.down_proj`.
    pub name: String,
    /// Decoder block, `None` for a linear outside the blocks.
    pub block: Option<usize>,
    /// Short kind, e.g. `down_proj`.
    pub kind: String,
    pub rows: usize,
    pub cols: usize,
    /// The plan fields for this module (`modules` unused).
    pub rule: Rule,
    pub selected: bool,
}

impl Row {
    pub fn params(&self) -> usize {
        self.rows * self.cols
    }
}

pub struct PlanEditor {
    pub rows: Vec<Row>,
    /// The preset the rows came from; cleared by the first edit so a run is never mislabelled.
    pub preset: Option<String>,
    pub description: Option<String>,
    /// The last plan applied, for its plan-level settings (everything but the rules), which the table does not edit
    /// and saving must keep.
    pub base: Plan,
    /// The rows resolved against the model, or the resolver's message.
    pub resolved: Result<ResolvedPlan, String>,
}

impl PlanEditor {
    /// Rows for every linear of `model`, all dense until a plan is applied.
    pub fn for_model(model: &LoadedModel) -> Self {
        let rows = model
            .model
            .linear_shapes()
            .into_iter()
            .map(|(name, rows, cols)| Row {
                block: block_of(&name),
                kind: name.rsplit('.').next().unwrap_or(&name).to_string(),
                name,
                rows,
                cols,
                rule: Rule { keep_dense: Some(true), ..Default::default() },
                selected: false,
            })
            .collect();
        let mut editor = PlanEditor { rows, preset: None, description: None, base: Plan::default(), resolved: Err(String::new()) };
        editor.refresh(model);
        editor
    }

    /// Display name of the plan: the preset; once edited, the setting every row shares (`w4g32`), else "custom".
    pub fn name(&self) -> String {
        if let Some(p) = &self.preset {
            return p.clone();
        }
        match self.rows.split_first() {
            Some((first, rest)) if rest.iter().all(|r| r.rule == first.rule) => super::spec::describe(&first.rule),
            _ => "custom".into(),
        }
    }

    /// Replaces every row's setting with what `plan` gives it. The plan is resolved first, so a bad plan is
    /// rejected as a whole with the resolver's message and the rows stay as they were.
    pub fn apply_plan(&mut self, plan: &Plan, model: &LoadedModel) -> Result<(), String> {
        plan_args::resolve(plan, model).map_err(|e| format!("{e:#}"))?;
        let matchers: Vec<Matcher> = plan.rules.iter().map(|r| Matcher::new(&r.modules)).collect::<Result<_, _>>()?;
        for row in &mut self.rows {
            let mut rule = Rule::default();
            for (r, m) in plan.rules.iter().zip(&matchers) {
                if m.is_match(&row.name) {
                    merge(&mut rule, r);
                }
            }
            if rule == Rule::default() {
                rule.keep_dense = Some(true);
            }
            row.rule = rule;
        }
        self.preset = plan.name.clone();
        self.description = plan.description.clone();
        self.base = Plan { rules: Vec::new(), ..plan.clone() };
        self.refresh(model);
        Ok(())
    }

    /// Sets the selected rows to `rule`; returns how many changed.
    pub fn set_selected(&mut self, rule: &Rule, model: &LoadedModel) -> usize {
        let mut n = 0;
        for row in self.rows.iter_mut().filter(|r| r.selected) {
            row.rule = Rule { modules: String::new(), ..rule.clone() };
            n += 1;
        }
        if n > 0 {
            self.edited(model);
        }
        n
    }

    /// Call after changing any row's rule.
    pub fn edited(&mut self, model: &LoadedModel) {
        self.preset = None;
        self.description = None;
        self.refresh(model);
    }

    pub fn refresh(&mut self, model: &LoadedModel) {
        self.resolved = plan_args::resolve(&self.to_plan(), model).map_err(|e| format!("{e:#}"));
    }

    pub fn selected_count(&self) -> usize {
        self.rows.iter().filter(|r| r.selected).count()
    }

    pub fn select_all(&mut self, on: bool) {
        self.rows.iter_mut().for_each(|r| r.selected = on);
    }

    /// Contiguous row ranges per decoder block, in model order.
    pub fn blocks(&self) -> Vec<(Option<usize>, std::ops::Range<usize>)> {
        let mut out: Vec<(Option<usize>, std::ops::Range<usize>)> = Vec::new();
        for (i, r) in self.rows.iter().enumerate() {
            match out.last_mut() {
                Some((b, range)) if *b == r.block => range.end = i + 1,
                _ => out.push((r.block, i..i + 1)),
            }
        }
        out
    }

    /// The rows as a plan: one rule per distinct setting, `*` when every row shares it, otherwise an anchored
    /// regex listing its modules. Rules never overlap, so their order cannot change the result.
    pub fn to_plan(&self) -> Plan {
        let mut groups: Vec<(Rule, Vec<&str>)> = Vec::new();
        for row in &self.rows {
            match groups.iter_mut().find(|(r, _)| *r == row.rule) {
                Some((_, names)) => names.push(&row.name),
                None => groups.push((row.rule.clone(), vec![&row.name])),
            }
        }
        let all = groups.len() == 1;
        let rules = groups
            .into_iter()
            .map(|(rule, names)| {
                let modules = if all {
                    "*".to_string()
                } else {
                    format!("re:^({})$", names.iter().map(|n| regex_escape(n)).collect::<Vec<_>>().join("|"))
                };
                Rule { modules, ..rule }
            })
            .collect();
        Plan { name: self.preset.clone(), description: self.description.clone(), rules, ..self.base.clone() }
    }

    /// Writes the rows as `dir/<name>.toml`, naming the plan `name`.
    pub fn save(&mut self, dir: &Path, name: &str) -> Result<PathBuf, String> {
        let path = save_preset(dir, name, self.to_plan())?;
        self.preset = Some(name.trim().to_string());
        Ok(path)
    }
}

/// Saves `plan` as the preset `dir/<name>.toml` (atomically, see `Plan::save`), naming the plan `name`.
pub fn save_preset(dir: &Path, name: &str, mut plan: Plan) -> Result<PathBuf, String> {
    let name = name.trim();
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(format!("preset name `{name}`: use letters, digits, `-`, `+` or `_`"));
    }
    plan.name = Some(name.to_string());
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{name}.toml"));
    plan.save(&path).map_err(|e| e.to_string())?;
    Ok(path)
}

fn block_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

fn regex_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut out, c| {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

/// Later rules override earlier ones field by field, as in `Plan::resolve`.
fn merge(into: &mut Rule, r: &Rule) {
    macro_rules! take {
        ($($f:ident),*) => { $( if r.$f.is_some() { into.$f = r.$f.clone(); } )* };
    }
    take!(method, bits, group, sym, act_order, static_groups, mse, sparsity, nm, keep_dense, damp);
}

/// Preset files (`*.toml`, `*.json`) in `dir`, sorted by name.
pub fn list_presets(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml" || e == "json"))
        .collect();
    out.sort();
    out
}

/// `presets/` of the source tree when it exists (a build from the checkout), else `./presets`.
pub fn default_presets_dir() -> PathBuf {
    let in_tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("presets");
    if in_tree.is_dir() {
        in_tree
    } else {
        PathBuf::from("presets")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whittle_core::model::{load_model, source::default_model_dir};

    fn editor() -> (PlanEditor, LoadedModel) {
        let m = load_model(&default_model_dir().unwrap()).unwrap();
        (PlanEditor::for_model(&m), m)
    }

    #[test]
    fn a_preset_expands_to_rows_and_folds_back_to_one_rule() {
        let (mut e, m) = editor();
        let plan = Plan::from_file(&default_presets_dir().join("w4g32.toml")).unwrap();
        e.apply_plan(&plan, &m).unwrap();
        assert!(e.rows.iter().all(|r| r.rule.bits == Some(4) && r.rule.group == Some(32)));
        assert_eq!(e.name(), "w4g32");
        let folded = e.to_plan();
        assert_eq!(folded.rules.len(), 1);
        assert_eq!(folded.rules[0].modules, "*");
        let direct = plan_args::resolve(&plan, &m).unwrap();
        assert_eq!(e.resolved.as_ref().unwrap(), &direct);
    }

    #[test]
    fn mixed_rows_fold_into_non_overlapping_rules_that_resolve_the_same() {
        let (mut e, m) = editor();
        e.apply_plan(&Plan::from_file(&default_presets_dir().join("w4g128.toml")).unwrap(), &m).unwrap();
        for r in e.rows.iter_mut().filter(|r| r.kind == "down_proj") {
            r.selected = true;
        }
        e.set_selected(&Rule { bits: Some(8), group: Some(-1), ..Default::default() }, &m);
        assert_eq!(e.preset, None);
        assert_eq!(e.name(), "custom");
        let plan = e.to_plan();
        assert_eq!(plan.rules.len(), 2);
        let again = plan_args::resolve(&plan, &m).unwrap();
        assert_eq!(&again, e.resolved.as_ref().unwrap());
        let down = again.modules.iter().find(|p| p.name.ends_with("2.mlp.down_proj")).unwrap();
        assert_eq!(down.job.as_ref().unwrap().quant.as_ref().unwrap().bits, 8);
    }

    #[test]
    fn a_bad_plan_leaves_the_rows_alone() {
        let (mut e, m) = editor();
        let bad = Plan::uniform(Rule { bits: Some(9), ..Default::default() });
        let err = e.apply_plan(&bad, &m).unwrap_err();
        assert!(err.contains("bits must be 2..8"), "{err}");
        assert!(e.rows.iter().all(|r| r.rule.keep_dense == Some(true)));
    }

    #[test]
    fn saved_presets_load_back() {
        let (mut e, m) = editor();
        e.apply_plan(&Plan::from_file(&default_presets_dir().join("2of4.toml")).unwrap(), &m).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = e.save(dir.path(), "mine").unwrap();
        let (mut e2, _) = editor();
        e2.apply_plan(&Plan::from_file(&path).unwrap(), &m).unwrap();
        assert_eq!(e2.preset.as_deref(), Some("mine"));
        assert_eq!(e2.resolved, e.resolved);
        assert!(e.save(dir.path(), "../escape").is_err());
    }
}
