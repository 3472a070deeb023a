def pytest_configure(config):
    config.addinivalue_line("markers", "browser: end-to-end test in JupyterLab and Notebook 7 with headless Chromium "
                                       "(part of the normal run; deselect with -m 'not browser')")
