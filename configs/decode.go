package configs

import (
	"encoding"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// source remembers where a file set each key, so that problems found after
// decoding still name their line.
type source struct {
	name  string
	lines map[string]int  // key path, as in messages → line
	bad   map[string]bool // keys that failed to decode; semantic checks skip them
}

// problem is one thing wrong with a config.
type problem struct {
	file string
	line int // 0: the key is not in the file
	key  string
	msg  string
}

func (p problem) Error() string {
	var b strings.Builder
	b.WriteString(p.file)
	if p.line > 0 {
		fmt.Fprintf(&b, ":%d", p.line)
	}
	if p.key != "" {
		b.WriteString(": " + p.key)
	}
	b.WriteString(": " + p.msg)
	return b.String()
}

// joinProblems orders problems as they appear in the file, those without a
// line last, so that a user can fix them top to bottom.
func joinProblems(ps []problem) error {
	order := func(p problem) int {
		if p.line == 0 {
			return int(^uint(0) >> 1)
		}
		return p.line
	}
	slices.SortStableFunc(ps, func(a, b problem) int { return order(a) - order(b) })
	errs := make([]error, len(ps))
	for i, p := range ps {
		errs[i] = p
	}
	return errors.Join(errs...)
}

// decode decodes data over c. The toml package's own decoder stops at the
// first bad value, so the file is read into a generic tree and copied onto
// c here, collecting a problem for every unknown key, wrong type and bad
// duration. Only a syntax error, after which nothing can be read, is
// returned as err.
func (s *source) decode(data []byte, c *Config) (problems []problem, err error) {
	var tree map[string]any
	if _, err := toml.Decode(string(data), &tree); err != nil {
		if pe, ok := errors.AsType[toml.ParseError](err); ok {
			return nil, problem{file: s.name, line: pe.Position.Line, msg: "invalid toml: " + pe.Message}
		}
		return nil, fmt.Errorf("%s: %w", s.name, err)
	}
	s.lines = indexLines(string(data))
	s.bad = map[string]bool{}
	d := decoder{src: s}
	d.value("", tree, reflect.ValueOf(c).Elem())
	return d.problems, nil
}

type decoder struct {
	src      *source
	problems []problem
}

func (d *decoder) fail(key, format string, args ...any) {
	d.src.bad[key] = true
	d.problems = append(d.problems, problem{file: d.src.name, line: d.src.lines[key], key: key, msg: fmt.Sprintf(format, args...)})
}

func (d *decoder) mismatch(key, want string, v any) {
	d.fail(key, "must be %s, not %s", want, tomlType(v))
}

// value copies the TOML value v into rv, which must be addressable. Struct
// fields are matched by their toml tag; map and slice elements whose type
// has setDefaults start from their defaults.
func (d *decoder) value(key string, v any, rv reflect.Value) {
	if u, ok := rv.Addr().Interface().(valueDecoder); ok {
		if err := u.decodeTOML(v); err != nil {
			d.fail(key, "%v", err)
		}
		return
	}
	if u, ok := rv.Addr().Interface().(encoding.TextUnmarshaler); ok {
		s, ok := v.(string)
		if !ok {
			d.mismatch(key, "a string", v)
			return
		}
		if err := u.UnmarshalText([]byte(s)); err != nil {
			d.fail(key, "%v", err)
		}
		return
	}
	switch rv.Kind() {
	case reflect.Pointer:
		// An optional table: nil unless the file has it, then its
		// defaults with the file's values over them.
		elem := reflect.New(rv.Type().Elem())
		setDefaults(elem.Elem())
		d.value(key, v, elem.Elem())
		rv.Set(elem)
	case reflect.String:
		s, ok := v.(string)
		if !ok {
			d.mismatch(key, "a string", v)
			return
		}
		rv.SetString(s)
	case reflect.Bool:
		b, ok := v.(bool)
		if !ok {
			d.mismatch(key, "a boolean", v)
			return
		}
		rv.SetBool(b)
	case reflect.Int:
		n, ok := v.(int64)
		if !ok {
			d.mismatch(key, "an integer", v)
			return
		}
		if rv.OverflowInt(n) {
			d.fail(key, "%d is out of range", n)
			return
		}
		rv.SetInt(n)
	case reflect.Slice:
		var items []any
		switch v := v.(type) {
		case []any:
			items = v
		case []map[string]any: // an array of tables: [[server.tokens]]
			for _, m := range v {
				items = append(items, m)
			}
		default:
			d.mismatch(key, "an array", v)
			return
		}
		out := reflect.MakeSlice(rv.Type(), len(items), len(items))
		for i, item := range items {
			setDefaults(out.Index(i))
			d.value(index(key, i), item, out.Index(i))
		}
		rv.Set(out)
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			d.mismatch(key, "a table", v)
			return
		}
		out := reflect.MakeMapWithSize(rv.Type(), len(m))
		for _, k := range slices.Sorted(maps.Keys(m)) {
			elem := reflect.New(rv.Type().Elem()).Elem()
			setDefaults(elem)
			d.value(join(key, k), m[k], elem)
			out.SetMapIndex(reflect.ValueOf(k), elem)
		}
		rv.Set(out)
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			d.mismatch(key, "a table", v)
			return
		}
		fields := map[string]reflect.Value{}
		for i := range rv.NumField() {
			f := rv.Type().Field(i)
			if name := f.Tag.Get("toml"); f.IsExported() && name != "" && name != "-" {
				fields[name] = rv.Field(i)
			}
		}
		for _, k := range slices.Sorted(maps.Keys(m)) {
			f, ok := fields[k]
			if !ok {
				d.fail(join(key, k), "unknown key")
				continue
			}
			d.value(join(key, k), m[k], f)
		}
	default:
		panic("configs: cannot decode into " + rv.Type().String())
	}
}

// valueDecoder is a type that reads any TOML value itself: one that may be
// written as an integer or a word (min_idle = 2 or "auto").
type valueDecoder interface{ decodeTOML(v any) error }

func setDefaults(rv reflect.Value) {
	if d, ok := rv.Addr().Interface().(interface{ setDefaults() }); ok {
		d.setDefaults()
	}
}

// tomlType names the TOML type of a decoded value for messages; it never
// shows the value, which may be a secret.
func tomlType(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case []any, []map[string]any:
		return "an array"
	case map[string]any:
		return "a table"
	default:
		return "a date/time"
	}
}

// join appends one key to a key path, quoted as TOML would need it.
func join(path, key string) string {
	if path == "" {
		return toml.Key{key}.String()
	}
	return path + "." + toml.Key{key}.String()
}

// index names an element of an array or array of tables.
func index(path string, i int) string { return path + "[" + strconv.Itoa(i) + "]" }

// indexLines maps every key path of a document that the toml package has
// accepted to the line that sets it, with the paths that messages use
// ("server.tokens[1].role"). toml v1.6.0 keeps key positions private, and
// keeps one per key name, which cannot tell the elements of an array of
// tables apart; so this scans for keys itself. It trusts the document to be
// valid TOML: it only has to skip values, not read them. Tables implied by
// a dotted key or header get the line of their first mention.
func indexLines(src string) map[string]int {
	x := &indexer{src: src, line: 1, lines: map[string]int{}, arrays: map[string]int{}}
	table := ""
	for x.pos < len(x.src) {
		start := x.pos
		x.space(true)
		switch {
		case x.pos >= len(x.src):
		case strings.HasPrefix(x.src[x.pos:], "[["):
			x.pos += 2
			table = x.header(x.keys(), true)
		case x.peek() == '[':
			x.pos++
			table = x.header(x.keys(), false)
		default:
			line := x.line
			path := x.dotted(table, x.keys(), line)
			x.space(false)
			if x.peek() == '=' {
				x.pos++
			}
			x.value(path)
		}
		if x.pos == start {
			x.pos++ // never spin on input this scanner misreads
		}
	}
	return x.lines
}

type indexer struct {
	src    string
	pos    int
	line   int
	lines  map[string]int
	arrays map[string]int // array-of-tables path → elements so far
}

func (x *indexer) peek() byte {
	if x.pos < len(x.src) {
		return x.src[x.pos]
	}
	return 0
}

// clamp undoes a skip past the end, possible only on a misread escape.
func (x *indexer) clamp() { x.pos = min(x.pos, len(x.src)) }

func (x *indexer) implicit(path string, line int) {
	if _, ok := x.lines[path]; !ok {
		x.lines[path] = line
	}
}

// header records a [table] or [[array]] header and returns its path.
func (x *indexer) header(keys []string, array bool) string {
	x.space(false)
	for x.peek() == ']' {
		x.pos++
	}
	path := ""
	for i, k := range keys {
		path = join(path, k)
		last := i == len(keys)-1
		if last && array {
			n := x.arrays[path]
			x.arrays[path] = n + 1
			x.implicit(path, x.line)
			path = index(path, n)
			x.lines[path] = x.line
			break
		}
		if n, ok := x.arrays[path]; ok { // a sub-table of the latest element
			path = index(path, n-1)
		}
		if last {
			x.lines[path] = x.line
		} else {
			x.implicit(path, x.line)
		}
	}
	return path
}

// dotted records a (dotted) key under table and returns its path.
func (x *indexer) dotted(table string, keys []string, line int) string {
	path := table
	for i, k := range keys {
		path = join(path, k)
		if i < len(keys)-1 {
			x.implicit(path, line)
		} else {
			x.lines[path] = line
		}
	}
	return path
}

// space skips blanks and comments, and newlines too when newlines is set.
func (x *indexer) space(newlines bool) {
	for x.pos < len(x.src) {
		switch c := x.src[x.pos]; {
		case c == ' ' || c == '\t' || c == '\r':
			x.pos++
		case c == '\n' && newlines:
			x.pos++
			x.line++
		case c == '#':
			for x.pos < len(x.src) && x.src[x.pos] != '\n' {
				x.pos++
			}
		default:
			return
		}
	}
}

func (x *indexer) keys() []string {
	var keys []string
	for {
		x.space(false)
		keys = append(keys, x.key())
		x.space(false)
		if x.peek() != '.' {
			return keys
		}
		x.pos++
	}
}

func (x *indexer) key() string {
	start := x.pos
	switch x.peek() {
	case '"':
		x.str('"', true)
		if k, err := strconv.Unquote(x.src[start:x.pos]); err == nil {
			return k
		}
		return strings.Trim(x.src[start:x.pos], `"`)
	case '\'':
		x.str('\'', false)
		return strings.Trim(x.src[start:x.pos], `'`)
	}
	for x.pos < len(x.src) {
		c := x.src[x.pos]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c >= 0x80) {
			break
		}
		x.pos++
	}
	return x.src[start:x.pos]
}

// value skips one value, recording the keys of inline tables in it.
func (x *indexer) value(path string) {
	x.space(false)
	switch rest := x.src[x.pos:]; {
	case strings.HasPrefix(rest, `"""`):
		x.multiline(`"""`, true)
	case strings.HasPrefix(rest, `'''`):
		x.multiline(`'''`, false)
	case x.peek() == '"':
		x.str('"', true)
	case x.peek() == '\'':
		x.str('\'', false)
	case x.peek() == '[':
		x.pos++
		for i := 0; ; {
			x.space(true)
			switch x.peek() {
			case 0:
				return
			case ']':
				x.pos++
				return
			case ',':
				x.pos++
			default:
				x.lines[index(path, i)] = x.line
				x.value(index(path, i))
				i++
			}
		}
	case x.peek() == '{':
		x.pos++
		for {
			x.space(true)
			switch x.peek() {
			case 0:
				return
			case '}':
				x.pos++
				return
			case ',':
				x.pos++
			default:
				line := x.line
				p := x.dotted(path, x.keys(), line)
				x.space(false)
				if x.peek() == '=' {
					x.pos++
				}
				x.value(p)
			}
		}
	default: // number, boolean, date/time
		start := x.pos
		for x.pos < len(x.src) && !strings.ContainsRune(",]}#\r\n", rune(x.src[x.pos])) {
			x.pos++
		}
		if x.pos == start && x.pos < len(x.src) {
			x.pos++ // never spin on input this scanner misreads
		}
	}
}

// str skips a one-line string quoted with q.
func (x *indexer) str(q byte, escapes bool) {
	defer x.clamp()
	x.pos++
	for x.pos < len(x.src) {
		switch c := x.src[x.pos]; {
		case escapes && c == '\\':
			x.pos += 2
		case c == q:
			x.pos++
			return
		case c == '\n':
			return
		default:
			x.pos++
		}
	}
}

// multiline skips a multi-line string, counting its lines. Up to two quotes
// right before the closing delimiter belong to the string.
func (x *indexer) multiline(delim string, escapes bool) {
	defer x.clamp()
	x.pos += 3
	for x.pos < len(x.src) {
		c := x.src[x.pos]
		switch {
		case escapes && c == '\\':
			x.pos++
			if x.peek() == '\n' {
				x.line++
			}
			x.pos++
		case strings.HasPrefix(x.src[x.pos:], delim):
			x.pos += 3
			for i := 0; i < 2 && x.peek() == delim[0]; i++ {
				x.pos++
			}
			return
		default:
			if c == '\n' {
				x.line++
			}
			x.pos++
		}
	}
}
