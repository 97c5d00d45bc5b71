package local

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/textproto"
	"strings"
)

// bootStep is one step of an instance's boot: a script run with bash, or a
// note printed to the console.
type bootStep struct {
	script bool
	body   []byte
}

// errUnsupportedUserData is what Launch says about user-data it cannot run.
var errUnsupportedUserData = errors.New("the local provider runs shell-script or MIME user-data only")

// bootSteps turns user-data into what each boot of the instance does, or
// refuses it. Empty user-data boots to nothing.
func bootSteps(userData []byte) ([]bootStep, error) {
	switch {
	case len(bytes.TrimSpace(userData)) == 0:
		return nil, nil
	case bytes.HasPrefix(userData, []byte("#!")):
		return []bootStep{{script: true, body: userData}}, nil
	case bytes.HasPrefix(userData, []byte("#cloud-config")):
		return nil, fmt.Errorf("%w: got a #cloud-config document", errUnsupportedUserData)
	case looksLikeMIME(userData):
		return mimeSteps(userData)
	}
	first, _, _ := bytes.Cut(userData, []byte("\n"))
	if len(first) > 40 {
		first = first[:40]
	}
	return nil, fmt.Errorf("%w: got user-data starting %q", errUnsupportedUserData, first)
}

func looksLikeMIME(b []byte) bool {
	first, _, _ := bytes.Cut(b, []byte("\n"))
	name, _, ok := strings.Cut(string(first), ":")
	return ok && (strings.EqualFold(name, "Content-Type") || strings.EqualFold(name, "MIME-Version"))
}

// mimeSteps reads a multipart user-data document the way cloud-init does:
// text/x-shellscript parts run in order, every other part is skipped with a
// note on the console.
func mimeSteps(userData []byte) ([]bootStep, error) {
	r := textproto.NewReader(bufio.NewReader(bytes.NewReader(userData)))
	h, err := r.ReadMIMEHeader()
	if err != nil {
		return nil, fmt.Errorf("reading MIME user-data header: %w", err)
	}
	media, params, err := mime.ParseMediaType(h.Get("Content-Type"))
	if err != nil {
		return nil, fmt.Errorf("reading MIME user-data content type: %w", err)
	}
	if !strings.HasPrefix(media, "multipart/") || params["boundary"] == "" {
		return nil, fmt.Errorf("%w: MIME user-data must be multipart with a boundary, got %s", errUnsupportedUserData, media)
	}
	mr := multipart.NewReader(r.R, params["boundary"])
	var steps []bootStep
	for n := 1; ; n++ {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			return steps, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading MIME user-data part %d: %w", n, err)
		}
		// NextPart already decodes quoted-printable; cloud-init's own
		// tooling (Python's email package) usually writes base64.
		var body io.Reader = p
		if strings.EqualFold(p.Header.Get("Content-Transfer-Encoding"), "base64") {
			body = base64.NewDecoder(base64.StdEncoding, p)
		}
		b, err := io.ReadAll(body)
		if err != nil {
			return nil, fmt.Errorf("reading MIME user-data part %d: %w", n, err)
		}
		ct, _, err := mime.ParseMediaType(p.Header.Get("Content-Type"))
		if err != nil {
			ct = "text/plain" // RFC 2046 default, which cloud-init also skips
		}
		if ct == "text/x-shellscript" {
			// MIME text travels with CRLF line ends; bash would take each
			// \r as part of a command.
			b = bytes.ReplaceAll(b, []byte("\r\n"), []byte("\n"))
			steps = append(steps, bootStep{script: true, body: b})
			continue
		}
		note := fmt.Sprintf("hangar-local: skipping user-data part %d (%s): the local provider runs only text/x-shellscript parts\n", n, ct)
		steps = append(steps, bootStep{body: []byte(note)})
	}
}
