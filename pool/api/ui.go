package api

import (
	"embed"
	"io/fs"
	"net/http"
)

// uiFiles is the status page: static files that hold no data, so they are
// served without a token; the page reads everything from /v1 with the
// token its user gives it.
//
//go:embed ui
var uiFiles embed.FS

// uiPolicy lets the page load only its own files and talk only to this
// server: no inline script or style, no framing, and no form submission, so
// that the token form cannot put a token in a URL even if app.js fails.
const uiPolicy = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
	"object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// uiHandler serves the status page under /ui/.
func uiHandler() http.Handler {
	root, err := fs.Sub(uiFiles, "ui")
	if err != nil {
		panic("the embedded status page has no ui directory: " + err.Error())
	}
	files := http.StripPrefix("/ui/", http.FileServerFS(root))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", uiPolicy)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Frame-Options", "DENY")
		// The files change with the binary, which has no build id to
		// version them by: revalidate rather than run an old app.js.
		h.Set("Cache-Control", "no-cache")
		files.ServeHTTP(w, r)
	})
}
