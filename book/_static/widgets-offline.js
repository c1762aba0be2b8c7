/* reFlow Book: point the ipywidgets embed manager at the vendored icon fonts.
 *
 * @jupyter-widgets/html-manager's embed-amd.js resolves its Font Awesome files against
 * window.__jupyter_widgets_assets_path__ (or, failing that, the page's own directory,
 * which is wrong for pages in sub-folders). This script is loaded just before
 * embed-amd.js (see nb_ipywidgets_js in _config.yml), so it can derive the absolute
 * URL of _static/vendor/jupyter-widgets/ from its own src, at any page depth and
 * under file:// as well as http(s)://.
 */
(function () {
  var me = document.currentScript;
  if (!me || !me.src) { return; }
  window.__jupyter_widgets_assets_path__ =
    me.src.replace(/widgets-offline\.js(\?.*)?$/, "vendor/jupyter-widgets/");
})();
