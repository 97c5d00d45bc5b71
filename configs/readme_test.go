package configs

import (
	"bufio"
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// readmeBlock is a fenced code block of README.md.
type readmeBlock struct {
	line int    // of the opening fence
	lang string // its info string's first word
	file string // what a `<!-- file: PATH -->` line just above names
	text string // between the fences, with a final newline
}

const fileMarker = "<!-- file: "

// readmeBlocks returns the fenced code blocks of a Markdown text, with the
// file marker of each. Fences are ``` at the start of a line, as every
// block of the README is written.
func readmeBlocks(t *testing.T, readme []byte) []readmeBlock {
	t.Helper()
	var blocks []readmeBlock
	var cur *readmeBlock
	var body strings.Builder
	prev := ""
	sc := bufio.NewScanner(bytes.NewReader(readme))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		switch {
		case cur == nil && strings.HasPrefix(line, "```"):
			fields := strings.Fields(strings.TrimPrefix(line, "```"))
			cur = &readmeBlock{line: n}
			if len(fields) > 0 {
				cur.lang = fields[0]
			}
			if file, ok := strings.CutPrefix(prev, fileMarker); ok {
				cur.file = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(file), "-->"))
			}
			body.Reset()
		case cur != nil && strings.TrimSpace(line) == "```":
			cur.text = body.String()
			blocks = append(blocks, *cur)
			cur = nil
		case cur != nil:
			body.WriteString(line + "\n")
		case strings.HasPrefix(prev, fileMarker):
			t.Errorf("README.md:%d: %s is not followed by a code block", n-1, strings.TrimSpace(prev))
		}
		prev = line
	}
	if cur != nil {
		t.Errorf("README.md:%d: code block never closed", cur.line)
	}
	return blocks
}

// Every example the README shows is a file of the repository that a test
// runs, so that none goes stale and none fails as written. The rules, for
// each fenced code block of README.md:
//
//   - Blocks of commands a user types at a shell, or their output
//     (```sh, ```console), are exempt, unless marked as below.
//   - Every other block (toml, python, yaml, json, bash …, or none) follows
//     a line <!-- file: PATH --> (PATH relative to the repository's root)
//     and is contained verbatim in that file: the whole file or an excerpt.
//   - A marked .toml file loads and validates offline (Load, as `hangar
//     config check --offline` does).
//   - Any other marked file is named by a _test.go file of the repository,
//     the test that runs it (ci/buildbot/master.cfg.example: the Buildbot
//     tests in cmd/hangar, which run it under Debian's Buildbot master).
func TestREADMEExamplesAreShipped(t *testing.T) {
	root := ".."
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	var tests []byte // every _test.go of the repository, to find a file's test in
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, "_test.go") && !strings.HasSuffix(path, "readme_test.go") {
			b, err := os.ReadFile(path)
			tests = append(tests, b...)
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	checked := map[string]bool{}
	blocks := readmeBlocks(t, readme)
	for _, b := range blocks {
		if b.file == "" {
			if b.lang != "sh" && b.lang != "console" {
				t.Errorf("README.md:%d: a ```%s block without a %sPATH --> line just above it: "+
					"examples other than commands typed at a shell must be files a test runs", b.line, b.lang, fileMarker)
			}
			continue
		}
		content, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(b.file)))
		if err != nil {
			t.Errorf("README.md:%d: %v", b.line, err)
			continue
		}
		if !bytes.Contains(content, []byte(b.text)) {
			t.Errorf("README.md:%d: the ```%s block is not in %s as written:\n%s", b.line, b.lang, b.file, b.text)
		}
		if checked[b.file] {
			continue
		}
		checked[b.file] = true
		if strings.HasSuffix(b.file, ".toml") {
			if _, err := Load(filepath.Join(root, filepath.FromSlash(b.file))); err != nil {
				t.Errorf("README.md:%d: %s does not validate: %v", b.line, b.file, err)
			}
			continue
		}
		if !bytes.Contains(tests, []byte(filepath.Base(b.file))) {
			t.Errorf("README.md:%d: no test of the repository names %s: an example nobody runs goes stale", b.line, b.file)
		}
	}
	if len(checked) == 0 {
		t.Errorf("README.md has no block marked with %sPATH -->; found %d blocks", fileMarker, len(blocks))
	}
}

// The rules above, on a README of each kind of block.
func TestREADMEBlockRules(t *testing.T) {
	readme := "# T\n\n```sh\nhangar pools\n```\n\n" +
		"<!-- file: configs/local.toml -->\n```toml\n[pools.demo]\n```\n" +
		"text\n```toml\nunmarked = 1\n```\n" +
		"<!-- file: ci/buildbot/master.cfg.example -->\n```python\nc['workers'] = [\n```\n"
	blocks := readmeBlocks(t, []byte(readme))
	want := []readmeBlock{
		{line: 3, lang: "sh", text: "hangar pools\n"},
		{line: 8, lang: "toml", file: "configs/local.toml", text: "[pools.demo]\n"},
		{line: 12, lang: "toml", text: "unmarked = 1\n"},
		{line: 16, lang: "python", file: "ci/buildbot/master.cfg.example", text: "c['workers'] = [\n"},
	}
	if len(blocks) != len(want) {
		t.Fatalf("blocks = %+v\nwant %+v", blocks, want)
	}
	for i := range want {
		if blocks[i] != want[i] {
			t.Errorf("block %d = %+v, want %+v", i, blocks[i], want[i])
		}
	}
}
