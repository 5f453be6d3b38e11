//! Request bodies shaped as Dify's code executor sends them, and the check of each
//! answer. The runners mirror the template transformers of langgenius/dify
//! (api/core/helper/code_executor/): the user's `main`, the inputs as base64 JSON, the
//! result printed between `<<RESULT>>` tags; Jinja2 adds its preload.

use std::io::{self, Write};

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Value, json};

use super::clip;

pub const RESULT_TAG: &str = "<<RESULT>>";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Python,
    Node,
}

impl Lang {
    /// The `language` field Dify sends.
    pub fn wire(self) -> &'static str {
        match self {
            Self::Python => "python3",
            Self::Node => "nodejs",
        }
    }
}

/// What the stdout of a correct answer holds.
#[derive(Clone, Debug)]
pub enum Expect {
    Stdout(&'static str),
    /// JSON between the result tags (the Python and JavaScript code nodes).
    ResultJson(Value),
    /// Text between the result tags (the Jinja2 node hands the rendering back as is).
    ResultText(&'static str),
}

#[derive(Clone, Debug)]
pub struct Payload {
    /// Short name, for `--only` and the JSON report.
    pub key: &'static str,
    pub title: &'static str,
    pub lang: Lang,
    pub code: String,
    pub preload: String,
    pub expect: Expect,
}

impl Payload {
    /// The body of `POST /v1/sandbox/run`; Dify always sends `preload`, even empty.
    pub fn body(&self, network: bool) -> Value {
        json!({"language": self.lang.wire(), "code": self.code, "preload": self.preload,
               "enable_network": network})
    }

    /// Whether `envelope` is the right answer: success, no error, the expected output.
    pub fn check(&self, envelope: &Value) -> Result<(), String> {
        let data = succeeded(envelope)?;
        let stdout = data["stdout"].as_str().unwrap_or_default();
        let wrong = || format!("unexpected stdout {:?}", clip(stdout, 200));
        match &self.expect {
            Expect::Stdout(want) if stdout == *want => Ok(()),
            Expect::Stdout(_) => Err(wrong()),
            Expect::ResultJson(want) => {
                let got: Value = result_between_tags(stdout)
                    .and_then(|s| serde_json::from_str(s).ok())
                    .ok_or_else(wrong)?;
                if got == *want { Ok(()) } else { Err(wrong()) }
            }
            Expect::ResultText(want) if result_between_tags(stdout) == Some(want) => Ok(()),
            Expect::ResultText(_) => Err(wrong()),
        }
    }
}

/// The `data` of an answer with code 0, exit code 0 and an empty `error`.
pub fn succeeded(envelope: &Value) -> Result<&Value, String> {
    let data = &envelope["data"];
    if envelope["code"] != 0 {
        return Err(format!(
            "code {}: {}",
            envelope["code"],
            clip(&envelope["message"].to_string(), 300)
        ));
    }
    if data["exit_code"] != 0 || data["error"].as_str() != Some("") {
        return Err(format!(
            "exit code {}, error {}",
            data["exit_code"],
            clip(&data["error"].to_string(), 300)
        ));
    }
    Ok(data)
}

/// What Dify's `<<RESULT>>(.*)<<RESULT>>` (greedy, across lines) extracts.
fn result_between_tags(stdout: &str) -> Option<&str> {
    let start = stdout.find(RESULT_TAG)? + RESULT_TAG.len();
    let end = stdout.rfind(RESULT_TAG)?;
    (end >= start).then(|| &stdout[start..end])
}

/// JSON with Python's default separators (`", "` and `": "`) and UTF-8 kept as is:
/// `json.dumps(inputs, ensure_ascii=False)`, which Dify encodes to base64.
struct PyJson;

/// The separator before an element or a key: none before the first.
fn comma<W: ?Sized + Write>(w: &mut W, first: bool) -> io::Result<()> {
    if first { Ok(()) } else { w.write_all(b", ") }
}

impl serde_json::ser::Formatter for PyJson {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        comma(w, first)
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        comma(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// The inputs as the transformers' `serialize_inputs` hands them to the runner.
fn inputs_base64(inputs: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyJson);
    inputs
        .serialize(&mut ser)
        .expect("inputs serialize to JSON");
    base64::engine::general_purpose::STANDARD.encode(out)
}

/// Mirrors Python3TemplateTransformer: the user's code, then decode the inputs, call
/// `main(**inputs)`, print `json.dumps(output, indent=4)` between the tags.
fn python3_runner(code: &str, inputs: &Value) -> String {
    let b64 = inputs_base64(inputs);
    format!(
        "# declare main function\n{code}\n\nimport json\nfrom base64 import b64decode\n\n\
         inputs_obj = json.loads(b64decode('{b64}').decode('utf-8'))\n\
         output_obj = main(**inputs_obj)\n\
         output_json = json.dumps(output_obj, indent=4)\n\
         result = f'''{RESULT_TAG}{{output_json}}{RESULT_TAG}'''\nprint(result)\n"
    )
}

/// Mirrors Jinja2TemplateTransformer's runner: a `main` that renders the template with
/// the inputs, its text printed between the tags.
fn jinja2_runner(template: &str, inputs: &Value) -> String {
    let b64 = inputs_base64(inputs);
    format!(
        "# declare main function\ndef main(**inputs):\n    import jinja2\n    \
         template = jinja2.Template('''{template}''')\n    return template.render(**inputs)\n\n\
         import json\nfrom base64 import b64decode\n\n\
         inputs_obj = json.loads(b64decode('{b64}').decode('utf-8'))\n\
         output = main(**inputs_obj)\n\
         result = f'''{RESULT_TAG}{{output}}{RESULT_TAG}'''\nprint(result)\n"
    )
}

/// Mirrors Jinja2TemplateTransformer's preload: import jinja2 and render a dummy
/// template in `_jinja2_preload_` before the runner.
fn jinja2_preload() -> String {
    "import jinja2\nfrom base64 import b64decode\n\n\
     def _jinja2_preload_():\n    template = jinja2.Template('{{s}}')\n    template.render(s='a')\n\n\
     if __name__ == '__main__':\n    _jinja2_preload_()\n"
        .to_string()
}

/// Mirrors NodeJsTemplateTransformer: the user's code, then decode the inputs, call
/// `main(inputs)`, print `JSON.stringify(output)` between the tags.
fn javascript_runner(code: &str, inputs: &Value) -> String {
    let b64 = inputs_base64(inputs);
    format!(
        "// declare main function\n{code}\n\n\
         var inputs_obj = JSON.parse(Buffer.from('{b64}', 'base64').toString('utf-8'))\n\
         var output_obj = main(inputs_obj)\n\
         var output_json = JSON.stringify(output_obj)\n\
         var result = `{RESULT_TAG}${{output_json}}{RESULT_TAG}`\nconsole.log(result)\n"
    )
}

fn hello(key: &'static str, title: &'static str, lang: Lang, code: &str) -> Payload {
    Payload {
        key,
        title,
        lang,
        code: code.into(),
        preload: String::new(),
        expect: Expect::Stdout("hello world\n"),
    }
}

pub fn python_hello() -> Payload {
    hello(
        "py-hello",
        "python hello",
        Lang::Python,
        "print('hello world')",
    )
}

pub fn node_hello() -> Payload {
    hello(
        "node-hello",
        "node hello",
        Lang::Node,
        "console.log('hello world')",
    )
}

/// Dify's default code node in `lang` (`main` joins two strings), with non-ASCII
/// inputs, wrapped by that language's `runner`.
fn code_node(
    (key, title): (&'static str, &'static str),
    lang: Lang,
    runner: fn(&str, &Value) -> String,
    main: &str,
) -> Payload {
    Payload {
        key,
        title,
        lang,
        code: runner(main, &json!({"arg1": "héllo", "arg2": " wörld"})),
        preload: String::new(),
        expect: Expect::ResultJson(json!({"result": "héllo wörld"})),
    }
}

pub fn python3_code_node() -> Payload {
    let main = "def main(arg1: str, arg2: str) -> dict:\n    return {\n        \"result\": arg1 + arg2,\n    }\n";
    code_node(
        ("py-code", "python3 code node"),
        Lang::Python,
        python3_runner,
        main,
    )
}

pub fn javascript_code_node() -> Payload {
    let main =
        "function main({arg1, arg2}) {\n    return {\n        result: arg1 + arg2\n    }\n}\n";
    code_node(
        ("js-code", "javascript code node"),
        Lang::Node,
        javascript_runner,
        main,
    )
}

/// A template node with a filter and a loop.
pub fn jinja2_template_node() -> Payload {
    let template = "{{ greeting }}, {{ name | upper }}!{% for i in items %} {{ i }}{% endfor %}";
    let inputs = json!({"greeting": "Hello", "name": "dify", "items": [1, 2, 3]});
    Payload {
        key: "jinja2",
        title: "jinja2 template node",
        lang: Lang::Python,
        code: jinja2_runner(template, &inputs),
        preload: jinja2_preload(),
        expect: Expect::ResultText("Hello, DIFY! 1 2 3"),
    }
}

/// Every payload, Python first.
pub fn all() -> Vec<Payload> {
    vec![
        python_hello(),
        python3_code_node(),
        jinja2_template_node(),
        node_hello(),
        javascript_code_node(),
    ]
}
