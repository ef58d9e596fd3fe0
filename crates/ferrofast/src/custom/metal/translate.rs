//! Metal Shading Language -> CUDA C++ source rewriting, token by token.
//!
//! The Metal library itself (types, math, SIMD-group functions, atomics, MLX's utilities)
//! lives in `prelude.cuh`; this pass only changes what C++ cannot express with a library:
//!
//! - address spaces: `device`, `thread` and (inside functions and parameter lists)
//!   `constant` disappear; a program-scope `constant` variable becomes `__constant__` (or
//!   stays a plain `constexpr`); `threadgroup` becomes `__shared__` on a variable declared in
//!   a function body and disappears on pointers and references;
//! - attributes: `[[kernel]]`, `[[buffer(i)]]`, `[[host_name(..)]]` and the thread-position
//!   attributes are removed, standard C++ attributes are kept, graphics ones are refused;
//!   the `kernel` keyword is removed (every function is a device function);
//! - vector type names (`float4`, `uint3`, `vec`, ...) are qualified as `metal::float4`
//!   (CUDA predefines different `float4`/`uint3` structs at global scope);
//! - swizzles: `v.rgba`-style names map to `.x/.y/.z/.w`, and multi-letter swizzles become
//!   `v.template ff_swz<0, 1>()` (or `ff_swz_ref`, a writable view, when assigned to); a
//!   name counts as a swizzle only if the source never declares an identifier of that name;
//! - literals: Metal has no double, so an unsuffixed floating literal is a float (`0.5` ->
//!   `0.5f`), and `1.0h` is a half;
//! - `#include` of Metal or MLX headers is dropped (the prelude provides them), and
//!   `#define` bodies are rewritten like code.
//!
//! Replacements never add or remove newlines, so line numbers in NVRTC's messages are the
//! Metal source's. Constructs with no CUDA counterpart (textures, samplers, `simdgroup_matrix`,
//! imageblocks, graphics stages, function constants, ...) are reported with their line.

use super::lexer::{tokenize, Kind, Token};
use std::collections::HashSet;

/// A construct the translator cannot express in CUDA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Untranslatable {
    /// 1-based line in the Metal source.
    pub(crate) line: usize,
    /// The construct as written (`texture2d`, `[[stage_in]]`, ...).
    pub(crate) construct: String,
    /// Why it has no translation.
    pub(crate) reason: &'static str,
}

/// Metal vector type names that get qualified with `metal::`.
fn is_vector_type(name: &str) -> bool {
    if name == "vec" {
        return true;
    }
    const BASES: [&str; 12] = [
        "float", "half", "bfloat", "int", "uint", "short", "ushort", "char", "uchar", "long",
        "ulong", "bool",
    ];
    BASES.iter().any(|b| {
        name.strip_prefix(b)
            .is_some_and(|n| matches!(n, "2" | "3" | "4"))
    })
}

/// Matrix types (`float4x4`, `half2x3`, ...), which the prelude does not provide.
fn is_matrix_type(name: &str) -> bool {
    ["float", "half", "bfloat"].iter().any(|b| {
        name.strip_prefix(b).is_some_and(|n| {
            let n = n.as_bytes();
            n.len() == 3
                && matches!(n[0], b'2'..=b'4')
                && n[1] == b'x'
                && matches!(n[2], b'2'..=b'4')
        })
    })
}

/// Identifiers with no CUDA translation, and why.
fn unsupported_ident(name: &str) -> Option<&'static str> {
    const TEXTURES: &str = "textures and samplers have no counterpart in a CUDA kernel over \
                            buffers; pass the data as an input array";
    const MATRIX: &str = "simdgroup matrices are not supported; write the product with \
                          scalar or vector arithmetic and SIMD-group functions";
    if name.starts_with("texture") || name.starts_with("depth2d") || name.starts_with("depthcube") {
        return Some(TEXTURES);
    }
    if let Some(rest) = name.strip_prefix("simdgroup_") {
        if rest.contains("matrix")
            || rest.ends_with("8x8")
            || matches!(rest, "load" | "store" | "multiply" | "multiply_accumulate")
        {
            return Some(MATRIX);
        }
    }
    if name.starts_with("packed_") {
        return Some("packed vector types are not supported; index a scalar pointer instead");
    }
    if is_matrix_type(name) {
        return Some("matrix types are not supported; use vectors or scalars");
    }
    match name {
        "sampler" => Some(TEXTURES),
        "imageblock" | "raster_order_group" => Some(
            "imageblocks and raster order groups are tile-shader features with no CUDA counterpart",
        ),
        "vertex" | "fragment" | "mesh" | "object" => {
            Some("only compute kernels can be translated, not graphics stages")
        }
        "visible_function_table"
        | "intersection_function_table"
        | "acceleration_structure"
        | "intersector" => Some("ray tracing and function tables have no CUDA counterpart"),
        _ => None,
    }
}

/// What a `[[...]]` attribute becomes.
enum AttrAction {
    Remove,
    Keep,
    Refuse(&'static str),
}

fn attribute_action(name: &str) -> AttrAction {
    const THREAD_ATTRIBUTES: [&str; 20] = [
        "dispatch_quadgroups_per_threadgroup",
        "dispatch_simdgroups_per_threadgroup",
        "dispatch_threads_per_threadgroup",
        "grid_origin",
        "grid_size",
        "quadgroup_index_in_threadgroup",
        "quadgroups_per_threadgroup",
        "simdgroup_index_in_threadgroup",
        "simdgroups_per_threadgroup",
        "thread_execution_width",
        "thread_index_in_quadgroup",
        "thread_index_in_simdgroup",
        "thread_index_in_threadgroup",
        "thread_position_in_grid",
        "thread_position_in_threadgroup",
        "threadgroup_position_in_grid",
        "threadgroups_per_grid",
        "threads_per_grid",
        "threads_per_simdgroup",
        "threads_per_threadgroup",
    ];
    match name {
        "kernel" | "buffer" | "host_name" | "max_total_threads_per_threadgroup" => {
            AttrAction::Remove
        }
        n if THREAD_ATTRIBUTES.contains(&n) => AttrAction::Remove,
        "maybe_unused" | "likely" | "unlikely" | "nodiscard" | "fallthrough" | "deprecated"
        | "noreturn" => AttrAction::Keep,
        "stage_in"
        | "position"
        | "vertex_id"
        | "instance_id"
        | "base_vertex"
        | "base_instance"
        | "color"
        | "render_target_array_index"
        | "viewport_array_index"
        | "point_size"
        | "clip_distance"
        | "front_facing"
        | "sample_id"
        | "sample_mask"
        | "point_coord"
        | "depth"
        | "stencil"
        | "primitive_id"
        | "barycentric_coord"
        | "user"
        | "flat"
        | "center_perspective"
        | "center_no_perspective"
        | "centroid_perspective"
        | "sample_perspective"
        | "patch"
        | "payload"
        | "mesh"
        | "object" => {
            AttrAction::Refuse("graphics-stage attributes have no meaning in a compute kernel")
        }
        "texture" | "sampler" => AttrAction::Refuse(
            "textures and samplers have no counterpart in a CUDA kernel over buffers; pass the \
             data as an input array",
        ),
        "function_constant" => AttrAction::Refuse(
            "function constants are not supported; use a template argument instead",
        ),
        "threadgroup" | "threadgroup_imageblock" | "imageblock_data" | "raster_order_group" => {
            AttrAction::Refuse(
                "threadgroup and imageblock arguments are not supported; declare \
                                threadgroup arrays inside the kernel body",
            )
        }
        _ => AttrAction::Refuse("unknown attribute"),
    }
}

/// The indices of a swizzle (`xy` -> `[0, 1]`, `bgr` -> `[2, 1, 0]`), if `name` is one.
fn swizzle_indices(name: &str) -> Option<Vec<usize>> {
    if name.is_empty() || name.len() > 4 {
        return None;
    }
    let from = |set: &str| -> Option<Vec<usize>> { name.chars().map(|c| set.find(c)).collect() };
    from("xyzw").or_else(|| from("rgba"))
}

/// Scope a brace opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// A function body or a block inside one.
    Code,
    /// A struct, class, union or enum body.
    Type,
    /// A namespace or `extern "C"` block.
    Namespace,
    /// A braced initializer.
    Init,
}

/// Rewrites one Metal source into CUDA C++ with the same lines.
pub(crate) fn translate(src: &str) -> Result<String, Untranslatable> {
    let tokens = tokenize(src, 1);
    let declared = declared_identifiers(&tokens);
    let mut out = String::with_capacity(src.len() + src.len() / 4);
    Rewriter {
        tokens: &tokens,
        declared: &declared,
        scopes: Vec::new(),
        parens: 0,
        in_macro: false,
    }
    .run(&mut out)?;
    Ok(out)
}

/// Identifiers the source uses other than after `.` or `->` (including in macro bodies):
/// a member with one of these names is the user's own, never a swizzle.
fn declared_identifiers(tokens: &[Token<'_>]) -> HashSet<String> {
    let mut set = HashSet::new();
    let collect = |toks: &[Token<'_>], set: &mut HashSet<String>| {
        let mut prev_member = false;
        for t in toks.iter().filter(|t| !t.is_trivia()) {
            if t.kind == Kind::Ident && !prev_member {
                set.insert(t.text.to_string());
            }
            prev_member = t.is_punct(".") || t.is_punct("->");
        }
    };
    collect(tokens, &mut set);
    for t in tokens.iter().filter(|t| t.kind == Kind::Directive) {
        let body = tokenize(&t.text[1..], t.line);
        collect(&body, &mut set);
    }
    set
}

struct Rewriter<'t, 'a> {
    tokens: &'t [Token<'a>],
    declared: &'t HashSet<String>,
    scopes: Vec<Scope>,
    parens: usize,
    /// Rewriting a `#define` body: scopes are unknown, so code is assumed.
    in_macro: bool,
}

impl<'t, 'a> Rewriter<'t, 'a> {
    fn next_sig(&self, i: usize) -> Option<usize> {
        (i + 1..self.tokens.len()).find(|&j| !self.tokens[j].is_trivia())
    }

    fn prev_sig(&self, i: usize) -> Option<usize> {
        (0..i).rev().find(|&j| !self.tokens[j].is_trivia())
    }

    fn in_code(&self) -> bool {
        self.in_macro || self.scopes.last() == Some(&Scope::Code)
    }

    fn at_namespace_scope(&self) -> bool {
        !self.in_macro
            && self.parens == 0
            && matches!(self.scopes.last(), None | Some(Scope::Namespace))
    }

    fn run(&mut self, out: &mut String) -> Result<(), Untranslatable> {
        let mut i = 0;
        while i < self.tokens.len() {
            let t = self.tokens[i];
            match t.kind {
                Kind::Space | Kind::Comment | Kind::Literal => out.push_str(t.text),
                Kind::Directive => self.directive(t, out)?,
                Kind::Number => number(t.text, out),
                Kind::Ident => self.ident(i, out)?,
                Kind::Punct => {
                    if t.text == "[" {
                        if let Some(j) = self.next_sig(i).filter(|&j| self.tokens[j].is_punct("["))
                        {
                            i = self.attribute(i, j, out)?;
                            continue;
                        }
                    }
                    self.punct(i);
                    out.push_str(t.text);
                }
            }
            i += 1;
        }
        Ok(())
    }

    fn punct(&mut self, i: usize) {
        match self.tokens[i].text {
            "(" => self.parens += 1,
            ")" => self.parens = self.parens.saturating_sub(1),
            "{" => {
                let scope = self.brace_scope(i);
                self.scopes.push(scope);
            }
            "}" => {
                self.scopes.pop();
            }
            _ => {}
        }
    }

    /// What the `{` at `i` opens.
    fn brace_scope(&self, i: usize) -> Scope {
        if self.in_code() {
            return Scope::Code;
        }
        let Some(p) = self.prev_sig(i) else {
            return Scope::Init;
        };
        let prev = self.tokens[p];
        if prev.is_punct(")")
            || ["const", "noexcept", "mutable", "override", "final"]
                .iter()
                .any(|k| prev.is_ident(k))
        {
            return Scope::Code;
        }
        if prev.kind == Kind::Literal {
            return Scope::Namespace;
        }
        // Look back over the declaration this brace belongs to.
        for j in (0..i).rev() {
            let t = self.tokens[j];
            if t.is_punct(";") || t.is_punct("{") || t.is_punct("}") || t.is_punct("=") {
                break;
            }
            if ["struct", "class", "union", "enum"]
                .iter()
                .any(|k| t.is_ident(k))
            {
                return Scope::Type;
            }
            if t.is_ident("namespace") {
                return Scope::Namespace;
            }
        }
        Scope::Init
    }

    fn ident(&mut self, i: usize, out: &mut String) -> Result<(), Untranslatable> {
        let t = self.tokens[i];
        let name = t.text;
        let prev = self.prev_sig(i).map(|p| self.tokens[p]);
        let after_member = prev.is_some_and(|p| p.is_punct(".") || p.is_punct("->"));
        let after_scope = prev.is_some_and(|p| p.is_punct("::"));
        if after_member {
            return self.member(i, out);
        }
        if let Some(reason) = unsupported_ident(name) {
            return Err(Untranslatable {
                line: t.line,
                construct: name.to_string(),
                reason,
            });
        }
        match name {
            "device" | "thread" | "kernel" => {}
            "constant" => {
                if self.at_namespace_scope() && !self.declaration_has(i, "constexpr") {
                    out.push_str("__constant__");
                }
            }
            "threadgroup" => {
                if self.in_code() && self.parens == 0 && !self.declares_pointer(i) {
                    out.push_str("__shared__");
                }
            }
            n if is_vector_type(n) && !after_scope => {
                out.push_str("metal::");
                out.push_str(n);
            }
            n => out.push_str(n),
        }
        Ok(())
    }

    /// A member name after `.` or `->`: swizzles are rewritten, other names kept.
    fn member(&self, i: usize, out: &mut String) -> Result<(), Untranslatable> {
        let name = self.tokens[i].text;
        let Some(idx) = swizzle_indices(name).filter(|_| !self.declared.contains(name)) else {
            out.push_str(name);
            return Ok(());
        };
        if idx.len() == 1 {
            out.push(['x', 'y', 'z', 'w'][idx[0]]);
            return Ok(());
        }
        let assigned = self.next_sig(i).is_some_and(|j| {
            let n = self.tokens[j];
            n.kind == Kind::Punct
                && matches!(
                    n.text,
                    "=" | "+=" | "-=" | "*=" | "/=" | "%=" | "&=" | "|=" | "^=" | "<<=" | ">>="
                )
        });
        let list: Vec<String> = idx.iter().map(|k| k.to_string()).collect();
        out.push_str(if assigned {
            "template ff_swz_ref<"
        } else {
            "template ff_swz<"
        });
        out.push_str(&list.join(", "));
        out.push_str(">()");
        Ok(())
    }

    /// True if the declaration around token `i` (back to the previous `;`, `{` or `}`,
    /// forward to `;`, `=` or `{`) contains the keyword `word`.
    fn declaration_has(&self, i: usize, word: &str) -> bool {
        let stop = |t: &Token<'_>| t.is_punct(";") || t.is_punct("{") || t.is_punct("}");
        let back = (0..i)
            .rev()
            .take_while(|&j| !stop(&self.tokens[j]))
            .any(|j| self.tokens[j].is_ident(word));
        let fwd = (i + 1..self.tokens.len())
            .take_while(|&j| !stop(&self.tokens[j]) && !self.tokens[j].is_punct("="))
            .any(|j| self.tokens[j].is_ident(word));
        back || fwd
    }

    /// True if the `threadgroup` at `i` qualifies a pointer or reference declarator rather
    /// than declaring threadgroup storage.
    fn declares_pointer(&self, i: usize) -> bool {
        for t in &self.tokens[i + 1..] {
            if t.kind == Kind::Punct {
                match t.text {
                    "*" | "&" | "&&" => return true,
                    ";" | "=" | "[" | "(" | "{" | "," | ")" => return false,
                    _ => {}
                }
            }
        }
        false
    }

    /// `[[ ... ]]` starting at `open` (the second `[` at `second`): removed, kept or refused.
    /// Returns the index after the closing `]]`.
    fn attribute(
        &self,
        open: usize,
        second: usize,
        out: &mut String,
    ) -> Result<usize, Untranslatable> {
        let t = self.tokens[open];
        let mut depth = 0usize;
        let mut close = None;
        for j in second + 1..self.tokens.len() {
            let u = self.tokens[j];
            if u.is_punct("[") || u.is_punct("(") {
                depth += 1;
            } else if (u.is_punct("]") || u.is_punct(")")) && depth > 0 {
                depth -= 1;
            } else if u.is_punct("]") {
                if let Some(k) = self.next_sig(j).filter(|&k| self.tokens[k].is_punct("]")) {
                    close = Some((j, k));
                }
                break;
            }
        }
        let Some((inner_end, end)) = close else {
            return Err(Untranslatable {
                line: t.line,
                construct: "[[".into(),
                reason: "attribute without a closing `]]`",
            });
        };
        let text: String = self.tokens[open..=end].iter().map(|t| t.text).collect();
        let inner = &self.tokens[second + 1..inner_end];
        let name = inner
            .iter()
            .find(|t| t.kind == Kind::Ident)
            .map_or("", |t| t.text);
        match attribute_action(name) {
            AttrAction::Keep => out.push_str(&text),
            AttrAction::Remove => {
                // Keep the line structure of attributes that span lines.
                out.extend(text.chars().filter(|&c| c == '\n'));
            }
            AttrAction::Refuse(reason) => {
                let construct: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
                return Err(Untranslatable {
                    line: t.line,
                    construct,
                    reason,
                });
            }
        }
        Ok(end + 1)
    }

    fn directive(&self, t: Token<'a>, out: &mut String) -> Result<(), Untranslatable> {
        let body = t.text[1..].trim_start();
        if let Some(rest) = body.strip_prefix("include") {
            let target = rest.trim();
            let name = target.trim_matches(|c| c == '<' || c == '>' || c == '"');
            if name.starts_with("metal_")
                || name.starts_with("simd/")
                || name.starts_with("mlx/backend/metal/")
            {
                // The prelude provides these; keep a marker so the line stays.
                out.push_str("// provided by ferrofast: ");
                out.push_str(&t.text.replace('\n', " "));
                return Ok(());
            }
            out.push_str(t.text);
            return Ok(());
        }
        if body.starts_with("pragma") && body.contains("METAL") {
            return Ok(());
        }
        if let Some(rest) = body.strip_prefix("define") {
            // `#define NAME` or `#define NAME(params)`, then the replacement, rewritten.
            let head_len = t.text.len() - rest.len();
            let rest_tokens = tokenize(rest, t.line);
            let mut k = 0;
            while k < rest_tokens.len() && rest_tokens[k].is_trivia() {
                k += 1;
            }
            if k < rest_tokens.len() && rest_tokens[k].kind == Kind::Ident {
                k += 1;
                if rest_tokens.get(k).is_some_and(|p| p.is_punct("(")) {
                    while k < rest_tokens.len() && !rest_tokens[k].is_punct(")") {
                        k += 1;
                    }
                    k += 1;
                }
            }
            let k = k.min(rest_tokens.len());
            out.push_str(&t.text[..head_len]);
            out.extend(rest_tokens[..k].iter().map(|t| t.text));
            let mut sub = Rewriter {
                tokens: &rest_tokens[k..],
                declared: self.declared,
                scopes: Vec::new(),
                parens: 0,
                in_macro: true,
            };
            return sub.run(out);
        }
        out.push_str(t.text);
        Ok(())
    }
}

/// A number: unsuffixed floating literals become float (Metal has no double), `h`-suffixed
/// ones become half.
fn number(text: &str, out: &mut String) {
    let lower = text.to_ascii_lowercase();
    let hex = lower.starts_with("0x");
    let floating = if hex {
        lower.contains('p')
    } else {
        lower.contains('.') || lower.contains('e')
    };
    if !floating {
        out.push_str(text);
        return;
    }
    if let Some(digits) = text.strip_suffix(['h', 'H']) {
        out.push_str("half(");
        out.push_str(digits);
        out.push_str("f)");
        return;
    }
    out.push_str(text);
    if !lower.ends_with('f') && !lower.ends_with('l') {
        out.push('f');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(src: &str) -> String {
        translate(src).unwrap()
    }

    fn err(src: &str) -> Untranslatable {
        translate(src).unwrap_err()
    }

    #[test]
    fn signature_loses_address_spaces_and_attributes() {
        let src = "template <typename T>\n[[kernel]] void k(\n  const device float* a [[buffer(0)]],\n  const constant float& d [[buffer(1)]],\n  device atomic<float>* o [[buffer(2)]],\n  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n}\n";
        let out = tr(src);
        assert_eq!(out.lines().count(), src.lines().count());
        assert!(out.contains("const  float* a ,"), "{out}");
        assert!(out.contains("const  float& d ,"), "{out}");
        assert!(out.contains(" atomic<float>* o ,"), "{out}");
        assert!(
            out.contains("metal::uint3 thread_position_in_grid )"),
            "{out}"
        );
        assert!(!out.contains("[["));
        assert!(!out.contains("device"));
    }

    #[test]
    fn explicit_instantiation_keeps_its_shape() {
        let out = tr("template [[host_name(\"k\")]] [[kernel]] decltype(k<1, float>) k<1, float>;");
        assert_eq!(out, "template   decltype(k<1, float>) k<1, float>;");
    }

    #[test]
    fn threadgroup_storage_becomes_shared_but_pointers_do_not() {
        let out = tr("void f(threadgroup float* p) {\n  threadgroup float buf[32];\n  threadgroup float* q = buf;\n  threadgroup atomic<int> n;\n}");
        assert!(out.contains("void f( float* p)"), "{out}");
        assert!(out.contains("__shared__ float buf[32];"), "{out}");
        assert!(out.contains(" float* q = buf;"), "{out}");
        assert!(!out.contains("__shared__ float* q"), "{out}");
        assert!(out.contains("__shared__ atomic<int> n;"), "{out}");
    }

    #[test]
    fn program_scope_constants() {
        let out = tr("constant float k[2] = {1.0, 2.0};\nconstant constexpr int n = 3;\nstruct S { static constexpr constant int m = 1; };\nvoid f(constant int* p) {}");
        assert!(
            out.contains("__constant__ float k[2] = {1.0f, 2.0f};"),
            "{out}"
        );
        assert!(out.contains(" constexpr int n = 3;"), "{out}");
        assert!(!out.contains("__constant__ constexpr"), "{out}");
        assert!(out.contains("static constexpr  int m = 1;"), "{out}");
        assert!(out.contains("void f( int* p)"), "{out}");
    }

    #[test]
    fn vector_types_are_qualified_once() {
        let out = tr("float4 a = float4(1); metal::float2 b; vec<float, 4> c; int d = x.float4;");
        assert_eq!(
            out,
            "metal::float4 a = metal::float4(1); metal::float2 b; metal::vec<float, 4> c; int d = x.float4;"
        );
    }

    #[test]
    fn swizzles() {
        let out =
            tr("float4 v; float2 t = v.xy; v.zw = t; v.zw += t; float s = v.r + v.a; p->bgr;");
        assert!(out.contains("t = v.template ff_swz<0, 1>();"), "{out}");
        assert!(out.contains("v.template ff_swz_ref<2, 3>() = t;"), "{out}");
        assert!(out.contains("v.template ff_swz_ref<2, 3>() += t;"), "{out}");
        assert!(out.contains("v.x + v.w"), "{out}");
        assert!(out.contains("p->template ff_swz<2, 1, 0>()"), "{out}");
    }

    #[test]
    fn declared_names_are_not_swizzles() {
        let out = tr("struct P { float xy; float a; }; P p; float s = p.xy + p.a + q.x;");
        assert!(out.contains("p.xy + p.a + q.x"), "{out}");
    }

    #[test]
    fn literals() {
        assert_eq!(
            tr("a = 0.5 + 1e3 + 2.0f + 3 + 0x10 + 1.5h + .5 + 2.L;"),
            "a = 0.5f + 1e3f + 2.0f + 3 + 0x10 + half(1.5f) + .5f + 2.L;"
        );
    }

    #[test]
    fn comments_strings_and_directives_are_preserved() {
        let src = "// device threadgroup 0.5\n#if defined(__FAST_MATH__) && __FAST_MATH__\nx = \"device 0.5\";\n#endif\n/* [[kernel]] */";
        assert_eq!(tr(src), src);
    }

    #[test]
    fn metal_includes_are_dropped_and_defines_rewritten() {
        let out = tr("#include <metal_stdlib>\n#define LOAD(p, i) (float4(p[i]) * 0.5)\n#include \"mine.h\"\nusing namespace metal;");
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("// provided by ferrofast: #include <metal_stdlib>"));
        assert_eq!(lines[1], "#define LOAD(p, i) (metal::float4(p[i]) * 0.5f)");
        assert_eq!(lines[2], "#include \"mine.h\"");
        assert_eq!(lines[3], "using namespace metal;");
    }

    #[test]
    fn standard_attributes_stay() {
        assert_eq!(tr("[[maybe_unused]] int x;"), "[[maybe_unused]] int x;");
        assert_eq!(tr("a[b[0]] = 1;"), "a[b[0]] = 1;");
    }

    #[test]
    fn untranslatable_constructs_name_the_line() {
        let e = err("int a;\nvoid f(texture2d<float> t) {}");
        assert_eq!((e.line, e.construct.as_str()), (2, "texture2d"));
        let e = err("\n\nvoid f(float4 p [[stage_in]]) {}");
        assert_eq!((e.line, e.construct.as_str()), (3, "[[stage_in]]"));
        let e = err("simdgroup_float8x8 m;");
        assert_eq!((e.line, e.construct.as_str()), (1, "simdgroup_float8x8"));
        let e = err("x;\ny;\nsimdgroup_matrix<float, 8, 8> m;");
        assert_eq!(e.line, 3);
        let e = err("imageblock<S> b;");
        assert_eq!(e.construct, "imageblock");
        let e = err("constant bool b [[function_constant(0)]];");
        assert_eq!(e.construct, "[[function_constant(0)]]");
        let e = err("float4x4 m;");
        assert_eq!(e.construct, "float4x4");
        assert_eq!(err("vertex float4 f() {}").construct, "vertex");
        assert_eq!(err("[[kernel]] void f(sampler s) {}").construct, "sampler");
    }

    #[test]
    fn simdgroup_barrier_is_not_a_matrix() {
        assert_eq!(
            tr("simdgroup_barrier(mem_flags::mem_none);"),
            "simdgroup_barrier(mem_flags::mem_none);"
        );
        let attrs = "uint simdgroup_index_in_threadgroup; uint simdgroups_per_threadgroup;";
        assert_eq!(tr(attrs), attrs);
        assert_eq!(err("simdgroup_load(m, p);").construct, "simdgroup_load");
    }
}
